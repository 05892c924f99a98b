"""Device profiles: one TOML file per device in targets/ (shipped) or $EDGEOPS_HOME/targets/
(calibrated copies, which take precedence).

A profile holds public-spec facts (ISA and features, cores, clock, peak GFLOP/s, memory
bandwidth, RAM, power mode, accepted runtimes and formats), the sources they come from, and the
efficiency factors of the latency predictor (edgeops.bench.estimate), which are priors until
`edgeops targets calibrate` fits them on the real machine. The schema is in targets/README.md.

The `host` profile (kind = "host") describes the machine edgeops runs on: its CPU facts are
detected at load time, so the same file works on any machine.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .paths import REPO_TARGETS, home

REQUIRED = {
    "": {"name": str, "title": str, "kind": str, "sources": list, "calibrated": bool},
    "cpu": {"isa": str, "features": list, "cores": int, "freq_ghz": (int, float),
            "fp32_flops_per_cycle": (int, float), "int8_ops_per_cycle": (int, float),
            "peak_gflops_fp32": (int, float), "peak_gops_int8": (int, float)},
    "memory": {"ram_gb": (int, float), "bandwidth_gbs": (int, float)},
    "power": {"mode": str},
    "runtime": {"runtimes": list, "formats": list},
    "efficiency": {"conv": (int, float), "depthwise": (int, float), "gemm": (int, float),
                   "rnn": (int, float), "int8": (int, float), "memory": (int, float),
                   "node_overhead_us": (int, float), "run_overhead_us": (int, float),
                   "parallel": (int, float)},
}

# optional keys (validated when present; edgeops.bench.estimate supplies the defaults)
OPTIONAL = {
    "memory": {"cache_mb": (int, float), "l2_mb": (int, float)},
    "efficiency": {"norm": (int, float), "llc": (int, float), "dram": (int, float),
                   "kernel_overhead_us": (int, float), "rnn_step_us": (int, float),
                   "struct_overhead_us": (int, float)},
}


@dataclass
class Profile:
    name: str
    data: dict
    path: Path
    origin: str          # "shipped" | "calibrated (user)"

    @property
    def calibrated(self) -> bool:
        return bool(self.data.get("calibrated"))

    def summary(self) -> dict:
        d, cpu, mem = self.data, self.data["cpu"], self.data["memory"]
        return {"name": self.name, "title": d["title"], "kind": d["kind"], "isa": cpu["isa"], "core": cpu.get("core", "?"),
                "cores": cpu["cores"], "freq_ghz": cpu["freq_ghz"],
                "peak_gflops_fp32": cpu["peak_gflops_fp32"], "ram_gb": mem["ram_gb"],
                "calibrated": self.calibrated, "origin": self.origin, "path": str(self.path)}


def user_dir() -> Path:
    return home() / "targets"


def _files() -> dict[str, tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    for base, origin in ((REPO_TARGETS, "shipped"), (user_dir(), "calibrated (user)")):
        if base.is_dir():
            for p in sorted(base.glob("*.toml")):
                found[p.stem] = (p, origin)
    return found


def names() -> list[str]:
    return sorted(_files())


def _validate(data: dict, path: Path) -> None:
    for table, keys in REQUIRED.items():
        sect = data if table == "" else data.get(table)
        if not isinstance(sect, dict):
            raise UsageError(f"{path}: profile lacks the [{table}] table",
                             hint="see targets/README.md for the schema")
        for key, typ in keys.items():
            where = f"{table}.{key}" if table else key
            if key not in sect:
                raise UsageError(f"{path}: profile lacks `{where}`",
                                 hint="see targets/README.md for the schema")
            val = sect[key]
            if not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
                raise UsageError(f"{path}: `{where}` should be a {_typename(typ)}, "
                                 f"got {val!r}")
            if isinstance(val, (int, float)) and not isinstance(val, bool) and \
                    (not math.isfinite(val) or val < 0):
                raise UsageError(f"{path}: `{where}` must be a finite number >= 0, got {val!r}")
    for table, keys in OPTIONAL.items():
        sect = data.get(table) or {}
        for key, typ in keys.items():
            if key in sect:
                val = sect[key]
                if not isinstance(val, typ) or isinstance(val, bool) or not math.isfinite(val) or val < 0:
                    raise UsageError(f"{path}: `{table}.{key}` must be a finite number >= 0, got {val!r}")
    if data["kind"] not in ("device", "host"):
        raise UsageError(f"{path}: `kind` is 'device' or 'host', got {data['kind']!r}")
    if data["kind"] == "device" and not data["sources"]:
        raise UsageError(f"{path}: a device profile must cite its sources")


def _typename(typ) -> str:
    if isinstance(typ, tuple):
        return "number"
    return {str: "string", list: "list", bool: "boolean", int: "integer"}.get(typ, typ.__name__)


def read(path: Path) -> dict:
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a valid TOML profile ({exc})") from None
    _validate(data, path)
    return data


def load(name_or_path: str | Path) -> Profile:
    """A profile by name (user copy first, then shipped) or by path to a .toml file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or os.sep in str(name_or_path):
        if not p.is_file():
            raise UsageError(f"target profile file {p} not found")
        path, origin = p, "file"
    else:
        files = _files()
        if str(name_or_path) not in files:
            raise UsageError(f"unknown target {str(name_or_path)!r}",
                             hint=f"known targets: {', '.join(sorted(files)) or 'none'} "
                                  "(edgeops targets list)")
        path, origin = files[str(name_or_path)]
    data = read(path)
    if data["kind"] == "host":
        detect_host(data)
    return Profile(name=data["name"], data=data, path=path, origin=origin)


# ----------------------------------------------------------------------------- host detection

def _flops_per_cycle(isa: str, feats: set[str]) -> tuple[int, int]:
    """Per-core peak (fp32 FLOP, int8 op) per cycle from the SIMD features. Priors only: the
    calibrated efficiency factors absorb what the features cannot tell (FMA port count)."""
    if isa == "x86_64":
        fp32 = 32 if ("avx512f" in feats or {"avx2", "fma"} <= feats) else 16 if "avx" in feats else 8
        if "avx512_vnni" in feats or "amx_int8" in feats:
            i8 = 128
        elif "avx_vnni" in feats or "avx2" in feats:
            i8 = 64
        else:
            i8 = 32
        return fp32, i8
    if isa == "arm64":
        return 16, (64 if "asimddp" in feats else 32)
    return 8, 16


def _sysfs_cache_bytes(level: int | None = None) -> int | None:
    """Largest data/unified cache of cpu0 (sysfs) -- of `level` if given -- in bytes."""
    best = None
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (d / "type").read_text().strip() == "Instruction" or \
                    (level is not None and int((d / "level").read_text()) != level):
                continue
            s = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
        try:
            v = int(float(s.rstrip("KMGB")) * mult)
        except ValueError:
            continue
        best = v if best is None else max(best, v)
    return best


def detect_host(data: dict) -> dict:
    """Fill the host profile's CPU and memory facts from this machine (in place)."""
    from .agent.bench_runner import _cpuinfo, _freq, _meminfo_mb
    from .optimize.isa import detect

    cpu = detect()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    f = _freq(range(cores or 1))
    mhz = f.get("max_freq_mhz") or f.get("freq_mhz")
    c = data["cpu"]
    c["isa"] = cpu.arch
    c["features"] = cpu.features
    c["core"] = _cpuinfo()[0] or c.get("core", "unknown")
    c["cores"] = int(cores or 1)
    if mhz:
        c["freq_ghz"] = round(mhz / 1000.0, 3)
    fp32, i8 = _flops_per_cycle(cpu.arch, set(cpu.features))
    c["fp32_flops_per_cycle"], c["int8_ops_per_cycle"] = fp32, i8
    c["peak_gflops_fp32"] = round(c["cores"] * c["freq_ghz"] * fp32, 1)
    c["peak_gops_int8"] = round(c["cores"] * c["freq_ghz"] * i8, 1)
    ram = _meminfo_mb("MemTotal")
    if ram:
        data["memory"]["ram_gb"] = round(ram / 1024.0, 1)
    llc, l2 = _sysfs_cache_bytes(), _sysfs_cache_bytes(2)
    if llc:
        data["memory"]["cache_mb"] = llc / 2**20
    if l2:
        data["memory"]["l2_mb"] = l2 / 2**20
    data.setdefault("detected", {})["note"] = (
        "cpu.*, memory.ram_gb and the cache sizes detected on this machine at load time")
    return data


# ----------------------------------------------------------------------------- saving

def save_calibrated(profile: Profile, efficiency: dict, calibration: dict) -> Path:
    """Write NAME.toml under $EDGEOPS_HOME/targets with fitted [efficiency] and [calibration];
    the shipped file is never modified."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in profile.data.items()}
    data.pop("detected", None)
    data["efficiency"] = {**data["efficiency"], **efficiency}
    data["calibration"] = calibration
    data["calibrated"] = True
    dst = user_dir() / f"{profile.name}.toml"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".toml.tmp")
    tmp.write_text(dumps(data))
    read(tmp)                                   # what we wrote must load back
    os.replace(tmp, dst)
    return dst


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(data: dict, prefix: str = "") -> str:
    """TOML for nested dicts of str/int/float/bool/lists (the profile schema)."""
    lines = [f"{k} = {_scalar(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            out += f"\n[{name}]\n" + dumps(v, name)
    return out
