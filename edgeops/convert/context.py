"""What a converter function receives besides its source and destination paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..formats.base import LoadOptions, Signature


@dataclass
class ConvertContext:
    source_format: str
    target_format: str
    source_signature: Signature
    # Inputs generated from the source signature (or the user's --inputs): converters
    # that trace (torch export, onnx2torch + trace, coremltools) use them as examples.
    sample_inputs: dict[str, np.ndarray]
    workdir: Path
    opset: int | None = None            # ONNX opset to target (None = converter default)
    precision: str = "fp32"             # Core ML compute precision: fp32 keeps parity
    load: LoadOptions = field(default_factory=LoadOptions)
    options: dict = field(default_factory=dict)  # free-form, e.g. {"minimum_deployment_target": "iOS15"}
    # per-output (atol, rtol) the hop is held to when the source is quantized (verify.
    # quantized_tolerances); converters that check their own result use the same
    tolerances: dict = field(default_factory=dict)
