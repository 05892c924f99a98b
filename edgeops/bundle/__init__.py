"""Signed bundles: what goes to devices.

  keys.py    Ed25519 signing keys (generate, load, list)
  trust.py   trust roots on the publishing side (init, rotate, apply, show)
  build.py   build / verify / inspect bundles from registry versions

The verification rules themselves live in edgeops.agent.verifier, which the device runs;
this package imports it, never the reverse.
"""
