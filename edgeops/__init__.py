"""edgeops: put ML models on edge devices, verified at every step.

Importing this package is cheap on purpose: no torch, tensorflow or coremltools is
imported here or by the CLI start-up. Frameworks are imported inside the format or
converter function that needs them.
"""

__version__ = "0.1.0"
