"""CPU features -> int8 settings, following onnxruntime's own quantization guidance.

onnxruntime's guidance (docs "Quantize ONNX models", sections "Data type selection" and
"When and why do I need to try U8U8 / reduce_range"):
  * x86-64 with AVX2/AVX-512 but *no* VNNI: the U8S8 kernels use VPMADDUBSW, which can
    saturate (the int16 pair sum overflows). reduce_range (7-bit weights) avoids it.
  * x86-64 with VNNI (AVX512-VNNI or AVX-VNNI) and ARM64: no saturation issue, so full 8-bit
    weights (reduce_range off).
  * Activations uint8 / weights int8 (U8S8) with per-channel weights is the fast, accurate
    combination for Conv/MatMul on these CPUs; QDQ format lets the runtime fuse.
  * Dynamic quantization of Conv goes through ConvInteger, which on x86 onnxruntime is far
    slower than float Conv (measured 4.7x slower here, STACK.md); only MatMul/Gemm-class ops
    are dynamically quantized by default.

Features come from /proc/cpuinfo (Linux), or from a target profile's `features` list, so
a model can be prepared on a laptop for a Raspberry Pi.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError

# feature names as Linux spells them in /proc/cpuinfo
X86_FEATURES = ("sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                "amx_int8", "f16c")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "fphp", "asimdhp", "sve")

# Gather: embedding tables stored int8 (onnxruntime's dynamic default quantizes them too)
DYNAMIC_OPS = ["MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather"]


@dataclass
class CpuFeatures:
    arch: str                       # "x86_64" | "arm64" | other machine string
    features: list[str]
    source: str                     # "this machine (/proc/cpuinfo)" or "target profile X"
    model: str | None = None

    def has(self, *names: str) -> bool:
        return any(n in self.features for n in names)

    @property
    def vnni(self) -> bool:
        return self.has("avx512_vnni", "avx_vnni", "amx_int8")

    @property
    def dotprod(self) -> bool:
        return self.has("asimddp")


@dataclass
class QuantSettings:
    """The choices made for int8, and why (shown in the report)."""
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    quant_format: str = "QDQ"
    dynamic_op_types: list[str] = field(default_factory=lambda: list(DYNAMIC_OPS))
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _norm_arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8", "armv8l"):
        return "arm64"
    return m


def detect(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    arch = _norm_arch(platform.machine())
    flags: set[str] = set()
    model = None
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags.update(val.split())
        elif key == "model name" and model is None:
            model = val.strip()
    known = X86_FEATURES if arch == "x86_64" else ARM_FEATURES
    return CpuFeatures(arch=arch, features=sorted(f for f in flags if f in known),
                       source=f"this machine ({cpuinfo})" if text else "this machine (no cpuinfo)",
                       model=model)


def from_target(target: str | Path) -> CpuFeatures:
    """Features from a target profile TOML: `isa = "arm64"` and `features = [...]`
    (top level or under [cpu]). NAME resolves to targets/NAME.toml in the repo."""
    import tomllib

    p = Path(target)
    if not p.suffix and not p.exists():
        from .. import targets

        prof = targets.load(str(target))        # shipped, calibrated copy, or detected host
        cpu = prof.data["cpu"]
        return CpuFeatures(arch=_norm_arch(str(cpu["isa"])),
                           features=sorted(str(f).lower() for f in cpu["features"]),
                           source=f"target profile {prof.name}", model=prof.data.get("title"))
    if not p.is_file():
        raise UsageError(f"target profile {target!r} not found",
                         hint="pass a profile file (targets/NAME.toml) with isa and features")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: not a valid TOML profile ({exc})") from None
    cpu = data.get("cpu", data)
    isa = cpu.get("isa") or data.get("isa")
    feats = cpu.get("features") or data.get("features")
    if not isa or not isinstance(feats, list):
        raise UsageError(f"{p}: the profile needs `isa` and a `features` list")
    return CpuFeatures(arch=_norm_arch(str(isa)), features=sorted(str(f).lower() for f in feats),
                       source=f"target profile {p.stem}", model=data.get("name"))


def choose(cpu: CpuFeatures) -> QuantSettings:
    s = QuantSettings()
    why = s.reasons
    if cpu.arch == "x86_64":
        if cpu.vnni:
            why.append("x86-64 with VNNI: U8S8 has no saturation issue, full 8-bit weights")
        elif cpu.has("avx2", "avx512f", "avx512bw"):
            s.reduce_range = True
            why.append("x86-64 AVX2/AVX-512 without VNNI: 7-bit weights (reduce_range) "
                       "avoid VPMADDUBSW saturation")
        else:
            s.reduce_range = True
            why.append("x86-64 without AVX2: reduce_range for the SSE int8 kernels")
        why.append("dynamic mode leaves Conv in float: ConvInteger is slower than float Conv "
                   "on x86 onnxruntime")
    elif cpu.arch == "arm64":
        if cpu.dotprod:
            why.append("ARM64 with dot-product (SDOT/UDOT): U8S8, full 8-bit weights")
        else:
            why.append("ARM64 without dot-product: U8S8, full 8-bit weights (no saturation "
                       "issue on ARM)")
        s.dynamic_op_types = DYNAMIC_OPS + ["Conv"]
        why.append("dynamic mode includes Conv: ConvInteger has no x86 slow path on ARM")
    else:
        s.reduce_range = True
        why.append(f"unknown architecture {cpu.arch!r}: conservative reduce_range")
    why.append("activations uint8 (asymmetric), weights int8 per-channel, QDQ format so "
               "onnxruntime fuses Q/DQ into QLinear kernels")
    return s
