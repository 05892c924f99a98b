"""Build, verify and inspect bundles: a registry version, signed for one target.

A bundle is an uncompressed, deterministic ustar file (edgeops.agent.verifier.write_archive):
  manifest.json             {"signed": manifest, "signatures": [...]}, canonical JSON
  payload/model/...         the model file(s) as stored in the registry (external data kept)
  payload/reference/...     reference inputs and expected outputs (.npy) for the health check
  roots/N.root.json         the trust root chain, so devices on an older root can rotate
(manifest first, the rest sorted; every entry's sha256 and size are in the signed manifest)
The same inputs (registry version, keys, counter, created time) give the same bytes:
SOURCE_DATE_EPOCH (or `created=`) fixes the time, Ed25519 signatures are deterministic.
The threshold that devices enforce is the one in their trust root, never one a bundle states
about itself (an attacker would state 1). Not covered: shipping to devices (fleet).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..agent import verifier as v
from ..errors import EXIT_VERIFY, EdgeopsError, UsageError
from . import trust as trust_mod
from .keys import SigningKey

DEFAULT_EXPIRES = timedelta(days=90)
MAX_DAYS = 3650
# the first onnxruntime release that runs each default-domain opset (onnxruntime's
# compatibility table); a device with an older runtime refuses the bundle in preflight
ORT_FOR_OPSET = {13: "1.7", 14: "1.10", 15: "1.11", 16: "1.12", 17: "1.13", 18: "1.14", 19: "1.16",
                 20: "1.17", 21: "1.18", 22: "1.20", 23: "1.22"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
             "ConvInteger", "DynamicQuantizeLinear", "QLinearAdd", "QGemm", "DynamicQuantizeMatMul"}


class BundleError(EdgeopsError):
    """A bundle that fails verification (exit 1)."""

    exit_code = EXIT_VERIFY


def parse_duration(text: str) -> timedelta:
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text or "")
    if not m:
        raise UsageError(f"--expires {text!r} is not a duration", hint="like 90d, 12h, 30m, 2w")
    n, unit = int(m.group(1)), m.group(2)
    if n <= 0:
        raise UsageError("--expires must be positive")
    if n > MAX_DAYS * {"s": 86400, "m": 1440, "h": 24, "d": 1, "w": 1 / 7}[unit]:
        raise UsageError(f"--expires {text!r} is longer than {MAX_DAYS} days",
                         hint="short lifetimes are the freeze protection; re-sign instead")
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[unit]: n})


def build_time(created: datetime | None = None) -> datetime:
    if created is None and os.environ.get("SOURCE_DATE_EPOCH"):
        try:
            seconds = int(os.environ["SOURCE_DATE_EPOCH"])
        except ValueError:
            raise UsageError("SOURCE_DATE_EPOCH must be an integer (seconds since 1970)") from None
        try:
            created = datetime.fromtimestamp(seconds, timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise UsageError(f"SOURCE_DATE_EPOCH {seconds} is out of range (year 1970..9999)") from None
    return (created or datetime.now(timezone.utc)).replace(microsecond=0)


@dataclass
class BuildResult:
    path: Path
    sha256: str
    size: int
    manifest: dict
    signed_by: list[str]
    root_version: int | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "size": self.size,
                "signed_by": self.signed_by, "root_version": self.root_version,
                "warnings": self.warnings, "manifest": self.manifest}


def _reference(model: Path, proto, inputs: Path | None, shapes: dict | None, atol: float | None,
               rtol: float | None, ref_dir: Path) -> tuple[dict, dict, str]:
    """Run the model here on reference inputs; the outputs become the health check's truth.
    `proto` is the model's graph (loaded without external data)."""
    import onnx

    from .. import verify
    from ..formats import onnx as onnx_fmt

    runner = onnx_fmt.OnnxRunner(model, threads=1)
    if inputs is not None:
        feeds = verify.load_inputs(inputs, runner.signature)
        source = f"{inputs.name} (sha256 {hashlib.sha256(inputs.read_bytes()).hexdigest()[:16]})" \
            if inputs.is_file() else inputs.name
    else:
        feeds = verify.make_inputs(runner.signature, shapes or {}, seed=0, batch=1)
        source = "generated (seed 0, batch 1)"
    outs = verify.run_on(runner, feeds, generated=inputs is None)
    quantized = bool({n.op_type for n in onnx_fmt.walk_nodes(proto.graph)} & QUANT_OPS)
    # fp16 weights: devices with fp16 arithmetic (ARMv8.2+) compute in half precision, x86 in fp32
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    ref_dir.mkdir(parents=True)
    ins, exp = {}, {}
    for i, (name, arr) in enumerate(feeds.items()):
        np.save(ref_dir / f"input_{i}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        ins[name] = {"file": f"payload/reference/input_{i}.npy", "dtype": str(arr.dtype), "shape": list(arr.shape)}
    for i, (name, arr) in enumerate(outs.items()):
        arr = np.asarray(arr)
        if arr.dtype == object:
            raise UsageError(f"output {name!r} is not a tensor (sequence or map)",
                             hint="health vectors need tensor outputs; use a model with tensor outputs")
        np.save(ref_dir / f"output_{i}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        entry = {"file": f"payload/reference/output_{i}.npy", "dtype": str(arr.dtype), "shape": list(arr.shape)}
        if arr.dtype.kind == "f":
            a, r = verify.tolerance_for("float16" if fp16 else str(arr.dtype), atol, rtol)
            if quantized and atol is None:
                # int8 kernels differ across ISAs (x86 u8s8 vs ARM s8s8, rounding): a few
                # quantization steps of the output range
                a = max(a, 0.02 * float(np.max(np.abs(arr))) if arr.size else a)
            if quantized and rtol is None:
                r = max(r, 0.02)
            entry.update(atol=a, rtol=r)
        else:
            entry.update(atol=0.0, rtol=0.0)   # labels and ids must match exactly
        exp[name] = entry
    return ins, exp, source + (", int8 model: widened tolerances" if quantized else "") \
        + (", fp16 weights: float16 tolerances" if fp16 else "")


PROFILE_SAMPLES = 1000
PROFILE_SECONDS = 10.0     # a slow model stops earlier (at >= 64 samples), and says so


def _profile(model: Path, data: Path | None, shapes: dict | None, samples: int, progress) -> dict:
    """The reference profile telemetry compares against (agent/profile.py): per-feature quantile
    bins of the inputs and outputs (class distribution for classifier outputs), from DATA (axis 0
    = samples) or, without it, from SAMPLES inputs generated like the health check's (seed 1000+i)."""
    from .. import verify
    from ..agent import profile as prof
    from ..formats import onnx as onnx_fmt

    runner = onnx_fmt.OnnxRunner(model, threads=1)
    if data is not None:
        feeds = verify.load_inputs(data, runner.signature)
        lengths = {len(a) if np.ndim(a) else None for a in feeds.values()}
        if len(lengths) == 1 and None not in lengths:     # axis 0 is the samples axis of every input
            n = lengths.pop()
            rows = [{k: a[i:i + 1] for k, a in feeds.items()} for i in range(min(n, samples))]
        else:       # a scalar input (e.g. a sample rate) or unequal first axes: the file is one sample
            rows = [feeds]
        source = f"{data.name}, {len(rows)} sample(s)"
    else:
        rows = None
        source = f"generated like the health check's inputs, {samples} sample(s)"
    ins: dict[str, list] = {}
    outs: dict[str, list] = {}
    t_end = __import__("time").time() + PROFILE_SECONDS
    got = 0
    for i in range(samples if rows is None else len(rows)):
        feeds_i = rows[i] if rows is not None else verify.make_inputs(runner.signature, shapes or {}, seed=1000 + i,
                                                                       batch=1)
        res = runner.run(feeds_i)
        for k, a in feeds_i.items():
            ins.setdefault(k, []).append(np.asarray(a))
        for k, a in res.items():
            a = np.asarray(a)
            if a.dtype != object:
                outs.setdefault(k, []).append(a)
        got += 1
        if __import__("time").time() > t_end and got >= 64:
            source += f" (stopped at {got} after {PROFILE_SECONDS:.0f}s)"
            break
    cat = lambda xs: np.concatenate([x.reshape(1) if x.ndim == 0 else x for x in xs], axis=0)  # noqa: E731
    profile = {"inputs": {}, "outputs": {}}
    for k, xs in ins.items():
        try:
            profile["inputs"][k] = prof.build(cat(xs))
        except ValueError:      # samples of different shapes (dynamic axes): no profile for it
            progress(f"profile: input {k} changes shape between samples; not profiled")
    for k, xs in outs.items():
        try:
            profile["outputs"][k] = prof.build(cat(xs), labels=True)
        except ValueError:
            progress(f"profile: output {k} changes shape between samples; not profiled")
    if got < 100:
        source += f"; only {got} sample(s): drift bins are coarse"
    return {"profile": {"inputs": prof.profile_json(profile["inputs"]), "outputs": prof.profile_json(profile["outputs"])},
            "source": source, "samples": got, "psi_bands": [prof.PSI_WARN, prof.PSI_ALERT]}


def _parity(lineage: dict | None) -> list[dict]:
    """Each verified step on the way here, newest first, from the lineage chain."""
    out = []
    rec = lineage
    while isinstance(rec, dict):
        for hop in rec.get("hops") or []:
            p = hop.get("parity") or {}
            out.append({"step": rec.get("step"), "from": hop.get("from"), "to": hop.get("to"),
                        "status": p.get("status"), "max_abs": p.get("max_abs"), "min_cosine": p.get("min_cosine")})
        for key in ("quantize", "prune", "distill"):
            if isinstance(rec.get(key), dict):
                d = rec[key]
                out.append({"step": rec.get("step"), "status": "passed" if d.get("passed", True) else "failed",
                            **{k: d.get(k) for k in ("metric", "metric_fp32", "metric_quantized", "metric_before",
                                                     "metric_after", "max_drop") if d.get(k) is not None}})
        rec = rec.get("parent")
    return out


def _runtime(m, files: dict, profile) -> dict:
    """Runtime requirements of the model graph `m` (loaded without external data)."""
    import onnxruntime

    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    domains = sorted({o.domain for o in m.opset_import if o.domain not in ("", "ai.onnx")})
    need = ORT_FOR_OPSET.get(opset) if opset is not None else None
    if opset is not None and need is None:
        need = ORT_FOR_OPSET[max(ORT_FOR_OPSET)] if opset > max(ORT_FOR_OPSET) else "1.7"
    return {"engine": "onnxruntime", "min_version": need, "built_with": onnxruntime.__version__,
            "opset": opset, "domains": domains, "ir_version": m.ir_version,
            "providers": ["CPUExecutionProvider"], "isa": profile.data["cpu"]["isa"],
            "model_bytes": sum(f["size"] for f in files.values()),
            "python": ">=3.9", "packages": ["numpy", "onnxruntime"]}


def build(ref: str, target: str, signers: list[SigningKey], out: Path, *, threshold: int | None = None,
          expires: timedelta | datetime = DEFAULT_EXPIRES, slo_ms: float | None = None,
          slo_percentile: str = "p99", trust_dir: Path | None = None, counter: int | None = None,
          inputs: Path | None = None, shapes: dict | None = None, atol: float | None = None,
          rtol: float | None = None, created: datetime | None = None, registry=None,
          allow_failed_lineage: bool = False, profile_data: Path | None = None,
          profile_samples: int = PROFILE_SAMPLES, progress=lambda msg: None) -> BuildResult:
    """Build and sign a bundle of registry version `ref` for `target`, then verify it with the
    device's own verifier before it is reported as built."""
    from .. import targets
    from ..registry import open_registry, parse_ref

    if not signers:
        raise UsageError("at least one --key is needed to sign a bundle")
    distinct = {k.keyid for k in signers}
    if len(distinct) != len(signers):
        raise UsageError("the same key was given twice; a threshold counts distinct keys")
    if threshold is not None and not 1 <= threshold <= len(distinct):
        raise UsageError(f"--threshold {threshold} needs at least {threshold} distinct --key (got {len(distinct)})")
    if slo_ms is not None and not slo_ms > 0:
        raise UsageError("--slo-ms must be positive")
    profile = targets.load(target)
    reg = registry or open_registry()
    name, version = parse_ref(ref)
    rec = reg.get(name, version)
    if rec.removed:
        raise UsageError(f"{rec.name}:{rec.version} was removed from the registry; its files are gone")
    if rec.format != "onnx":
        raise UsageError(f"{rec.name}:{rec.version} is {rec.format}; bundles carry ONNX models for onnxruntime",
                         hint="edgeops convert MODEL --to onnx, then edgeops registry add")
    failed = [p for p in _parity(rec.lineage) if p.get("status") == "failed"]
    if failed and not allow_failed_lineage:
        raise BundleError(f"{rec.name}:{rec.version} failed a check on its way here ({failed[0]['step']}: "
                          "status failed in its lineage); a bundle would ship an unchecked model",
                          hint="fix the model, or pass --allow-failed-lineage to ship it anyway")
    warnings = [f"shipping despite a failed check in the lineage ({p['step']})" for p in failed]
    tdir = trust_dir or (trust_mod.default_dir() if (trust_mod.default_dir() / v.ROOT_FILE).exists() else None)
    root = oldest = None
    roots: dict[int, bytes] = {}
    if tdir is not None:
        root = trust_mod.load(tdir)
        roots, oldest = trust_mod.verify_history(tdir, root)
        allowed = set(root.roles["bundle"].keyids)
        have = distinct & allowed
        strangers = sorted(k.name for k in signers if k.keyid not in allowed)
        if len(have) < root.roles["bundle"].threshold:
            raise UsageError(f"devices that trust {tdir} (root v{root.version}) need "
                             f"{root.roles['bundle'].threshold} signature(s) from its bundle keys; "
                             f"these keys give {len(have)}" + (f" ({', '.join(strangers)} not in it)" if strangers else ""),
                             hint=f"edgeops trust show {tdir}")
    else:
        warnings.append("no trust root (edgeops trust init): the bundle was not checked against one")
    t0 = build_time(created)
    exp = expires if isinstance(expires, datetime) else t0 + expires
    if exp <= datetime.now(timezone.utc):
        raise UsageError(f"the bundle would already be expired ({v.format_time(exp)})")
    if root is not None and exp > root.expires:
        warnings.append(f"the bundle expires after trust root v{root.version} ({v.format_time(root.expires)}); "
                        "devices refuse it from then on unless the root is renewed")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory; give a file path")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise UsageError(f"-o {out}: a folder on its path is not a directory")
    work = Path(tempfile.mkdtemp(prefix="edgeops-bundle-"))
    try:
        progress(f"materializing {rec.name}:{rec.version} from the registry")
        model = reg.materialize(rec, work / "model")
        progress("computing reference outputs for the health check")
        import onnx

        proto = onnx.load(str(model), load_external_data=False)
        ins, exp_out, source = _reference(model, proto, inputs, shapes, atol, rtol, work / "reference")
        progress("profiling inputs and outputs for drift (telemetry reference)")
        try:
            tele = _profile(model, profile_data if profile_data is not None else inputs, shapes,
                            max(1, int(profile_samples)), progress)
        except EdgeopsError:
            raise
        except Exception as exc:  # noqa: BLE001 - said in the manifest and as a warning, never silent
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            tele = {"profile": None, "error": why, "source": None, "samples": 0}
            warnings.append(f"no drift profile (telemetry reports no PSI for this bundle): {why}; "
                            "pass --profile-data with real samples")
        if tele.get("profile") and profile_data is None and inputs is None:
            warnings.append("the drift reference comes from generated inputs: real traffic will show as drift "
                            "against it; pass --profile-data with calibration or evaluation samples")
        members: dict[str, Path] = {}
        for rel in sorted(rec.files):
            members[f"payload/model/{rel}"] = work / "model" / rel
        for p in sorted((work / "reference").iterdir()):
            members[f"payload/reference/{p.name}"] = p
        for n in members:
            why = v.check_name(n)
            if why:
                raise UsageError(f"cannot bundle {n!r}: {why}", hint="rename the model file(s) and add them again")
        files = {n: {"sha256": _sha256(p), "size": p.stat().st_size} for n, p in members.items()}
        root_files = {f"roots/{n}.root.json": roots[n] for n in roots}
        if counter is None:
            counter = reg.next_bundle_counter(rec.name)
        if not 1 <= counter <= v.MAX_COUNTER:
            raise UsageError(f"bundle counter {counter} is outside 1..2**53-1")
        manifest = {
            "_type": v.BUNDLE_TYPE, "schema_version": v.SCHEMA_VERSION,
            "name": rec.name, "version": rec.version, "counter": counter, "target": profile.name,
            "created": v.format_time(t0), "expires": v.format_time(exp),
            "files": files, "model": f"payload/model/{rec.main_file}",
            "roots": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in root_files.items()},
            "runtime": _runtime(proto, {k: x for k, x in files.items() if k.startswith("payload/model/")}, profile),
            "health": {"inputs": ins, "expected": exp_out, "source": source},
            "slo": {"latency_ms": slo_ms, "percentile": slo_percentile, "threads": 1} if slo_ms else None,
            "telemetry": tele,
            "lineage": rec.lineage, "parity": _parity(rec.lineage),
            "registry": {"name": rec.name, "version": rec.version, "sha256": rec.sha256, "stage": rec.stage,
                         "metrics": rec.metrics},
            "builder": {"edgeops": __version__},
        }
        envelope = trust_mod.sign_envelope(v.BUNDLE_TYPE, manifest, signers)
        rest = {**members, **root_files}
        ordered = [(v.MANIFEST, envelope)] + [(n, rest[n]) for n in sorted(rest)]
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"-o {out}: cannot create its folder ({exc.strerror})") from None
        progress(f"writing {out}")
        # a fresh temp name (O_EXCL) per build: concurrent builds and planted symlinks are harmless
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                v.write_archive(f, ordered)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            if oldest is not None:   # the device's verifier, from the OLDEST root a device may hold
                res = v.verify_bundle(tmp, oldest, target=profile.name, installed=None)
                if not res.ok or res.root_version != root.version:
                    raise BundleError("the bundle just built does not verify: " +
                                      ("; ".join(x.message for x in res.failures) or
                                       f"it reaches root v{res.root_version}, not v{root.version}"))
                signed_by = res.signed_by
            else:
                signed_by = sorted(distinct)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        digest = _sha256(out)
        reg.record_bundle(rec.name, rec.version, profile.name, counter, digest, str(out.resolve()),
                          manifest["expires"], sorted(distinct))
        return BuildResult(out, digest, out.stat().st_size, manifest, signed_by,
                           root.version if root else None, warnings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def inspect(path: Path) -> dict:
    """What a bundle says about itself. NOT a verification: nothing here is trusted."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such bundle")
    try:
        entries, env = v.peek(path)
    except v.Refused as exc:
        raise UsageError(f"{path}: not a readable bundle: {exc}") from None
    signed = env["signed"]
    return {"path": str(path), "size": path.stat().st_size, "sha256": _sha256(path),
            "entries": [{"name": e.name, "size": e.size} for e in entries],
            "signatures": [s.get("keyid") for s in (env.get("signatures") if isinstance(env.get("signatures"), list)
                                                    else []) if isinstance(s, dict)],
            "manifest": signed, "verified": False}


def verify(path: Path, trust_dir: Path, *, target: str | None = None, installed: v.Installed | None = None,
           allow_same_version: bool = False, now: datetime | None = None,
           extract_to: Path | None = None) -> v.VerifyResult:
    """The device's verification, run here (returns the result; callers decide to raise)."""
    root = trust_mod.load(Path(trust_dir))
    return v.verify_bundle(path, root, target=target, installed=installed, now=now,
                           allow_same_version=allow_same_version, extract_to=extract_to)
