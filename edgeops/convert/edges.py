"""The conversion graph: one Edge per (source format, target format).

Declared as data so that listing the matrix (`edgeops formats`) imports no framework:
`func` is a "module:function" string resolved only when the edge runs. Registering the
same (source, target) twice is an error, as in skl2onnx's registry.

A converter function has the signature

    def convert(src: Path, dst: Path, ctx: ConvertContext) -> dict

It writes `dst` and returns facts for the report (tool versions, notes). It raises
ConversionError (unsupported op: name the op and the converter) or MissingExtraError.
It does not verify: the planner verifies every hop with edgeops.verify.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    func: str                      # "edgeops.convert.torch:torchscript_to_onnx"
    extras: tuple[str, ...]        # optional dependency groups the edge needs
    tool: str                      # the converter underneath, for the report
    atol: float = 1e-4             # parity tolerance for this hop (fp32 default)
    rtol: float = 1e-3
    note: str = ""
    cost: float = 1.0              # planner weight: heavier or less faithful routes cost more

    def __post_init__(self):
        if self.source == self.target:
            raise ValueError(f"edge {self.source}->{self.target} is a loop")
        if ":" not in self.func:
            raise ValueError(f"edge func must be 'module:function', got {self.func!r}")
        if self.atol < 0 or self.rtol < 0:
            raise ValueError("tolerances must be >= 0")
        if self.cost <= 0:
            raise ValueError("edge cost must be > 0")

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.target)


_C = "edgeops.convert."

EDGES: tuple[Edge, ...] = (
    # -> ONNX, the hub
    Edge("sklearn", "onnx", _C + "sklearn:sklearn_to_onnx", ("sklearn",), "skl2onnx",
         note="classifier outputs as tensors (zipmap off)"),
    Edge("keras-h5", "onnx", _C + "tensorflow:keras_to_onnx", ("tensorflow",), "tf2onnx",
         note="via tf.function (works for Keras 2 and Keras 3 files)"),
    Edge("keras-v3", "onnx", _C + "tensorflow:keras_to_onnx", ("tensorflow",), "tf2onnx",
         note="via tf.function"),
    Edge("savedmodel", "onnx", _C + "tensorflow:savedmodel_to_onnx", ("tensorflow",), "tf2onnx"),
    Edge("graphdef", "onnx", _C + "tensorflow:graphdef_to_onnx", ("tensorflow",), "tf2onnx"),
    Edge("tflite", "onnx", _C + "tensorflow:tflite_to_onnx", ("tensorflow",), "tf2onnx (TFLite frontend)"),
    Edge("torchscript", "onnx", _C + "torch:torchscript_to_onnx", ("torch",),
         "torch.onnx (TorchScript exporter)", note="dynamo=True refuses ScriptModules"),
    Edge("torch-export", "onnx", _C + "torch:exported_to_onnx", ("torch",),
         "torch.onnx (dynamo exporter)"),
    # ONNX -> others
    Edge("onnx", "torchscript", _C + "torch:onnx_to_torchscript", ("torch",), "onnx2torch + trace",
         note="onnx2torch covers opset <= 17 and not the ai.onnx.ml domain"),
    # onnx2tf rewrites the graph (NCHW -> NHWC inside) and pulls in TensorFlow: as a
    # stepping stone to Core ML it costs more than onnx2torch
    Edge("onnx", "savedmodel", _C + "onnx2tf:onnx_to_savedmodel", ("onnx2tf",), "onnx2tf",
         note="inputs keep their ONNX (NCHW) layout; outputs keep ONNX names", cost=1.5),
    Edge("onnx", "tflite", _C + "onnx2tf:onnx_to_tflite", ("onnx2tf",), "onnx2tf",
         note="float32 (fp16 weights with --precision fp16); inputs keep their ONNX layout"),
    # -> Core ML (ML program .mlpackage, or neural network .mlmodel when asked)
    Edge("torchscript", "mlpackage", _C + "coreml:torch_to_coreml", ("torch", "coreml"), "coremltools"),
    Edge("torchscript", "mlmodel", _C + "coreml:torch_to_coreml", ("torch", "coreml"), "coremltools"),
    Edge("torch-export", "mlpackage", _C + "coreml:torch_to_coreml", ("torch", "coreml"), "coremltools"),
    Edge("torch-export", "mlmodel", _C + "coreml:torch_to_coreml", ("torch", "coreml"), "coremltools"),
    Edge("keras-h5", "mlpackage", _C + "coreml:keras_to_coreml", ("tensorflow", "coreml"), "coremltools"),
    Edge("keras-h5", "mlmodel", _C + "coreml:keras_to_coreml", ("tensorflow", "coreml"), "coremltools"),
    Edge("keras-v3", "mlpackage", _C + "coreml:keras_to_coreml", ("tensorflow", "coreml"), "coremltools"),
    Edge("keras-v3", "mlmodel", _C + "coreml:keras_to_coreml", ("tensorflow", "coreml"), "coremltools"),
    Edge("savedmodel", "mlpackage", _C + "coreml:savedmodel_to_coreml", ("tensorflow", "coreml"), "coremltools"),
    Edge("savedmodel", "mlmodel", _C + "coreml:savedmodel_to_coreml", ("tensorflow", "coreml"), "coremltools"),
    Edge("graphdef", "mlpackage", _C + "coreml:graphdef_to_coreml", ("tensorflow", "coreml"), "coremltools"),
    Edge("graphdef", "mlmodel", _C + "coreml:graphdef_to_coreml", ("tensorflow", "coreml"), "coremltools"),
)
