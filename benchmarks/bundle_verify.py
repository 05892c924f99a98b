"""What signing and verifying a bundle costs, next to what a glue script would do.

Builds a registry version of an MLP of about SIZE_MB of float32 weights, bundles it for rpi4
with two keys (threshold 2), then times, best of ROUNDS each, on the same file:
  floor      sha256 of the bundle file (hashlib): the least any integrity check can cost
  glue       python tarfile extractall + sha256 of each extracted file (no signature, no
             safety checks: what `tar x && sha256sum -c` amounts to)
  verify     edgeops verify_bundle: archive walk, canonical checks, signatures, hashes
  verify+x   the same, writing the payload out while hashing (what a device does)
and prints bundle size against the model size. Run: python benchmarks/bundle_verify.py [SIZE_MB]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROUNDS = 5


def mlp(path: Path, size_mb: float) -> Path:
    width = int((size_mb * (1 << 20) / 4 / 2) ** 0.5)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.01, f"w{i}")
             for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def best(fn) -> float:
    times = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    size_mb = float(sys.argv[1]) if len(sys.argv) > 1 else 64
    work = Path(tempfile.mkdtemp(prefix="edgeops-bench-bundle-"))
    os.environ["EDGEOPS_HOME"] = str(work / "home")
    try:
        from edgeops.agent import verifier as v
        from edgeops.bundle import build as b, keys, trust
        from edgeops.registry import open_registry

        for n in ("release", "qa"):
            keys.generate(n)
        signers = [keys.load_signing("release"), keys.load_signing("qa")]
        trust.init(trust.default_dir(), signers[:1], [s.public_key for s in signers], 2, 1,
                   datetime.now(timezone.utc) + timedelta(days=1))
        model = mlp(work / "mlp.onnx", size_mb)
        open_registry().add(model, "mlp")
        out = work / "mlp.bundle"
        t = time.perf_counter()
        b.build("mlp", "rpi4", signers, out)
        t_build = time.perf_counter() - t
        root = v.load_trust(trust.default_dir())

        def floor():
            h = hashlib.sha256()
            with open(out, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)

        def glue():
            d = work / "glue"
            shutil.rmtree(d, ignore_errors=True)
            with tarfile.open(out) as tf:
                tf.extractall(d, filter="data")
            for p in d.rglob("*"):
                if p.is_file():
                    hashlib.sha256(p.read_bytes()).hexdigest()

        def verify():
            assert v.verify_bundle(out, root, target="rpi4", installed=None).ok

        def verify_x():
            d = work / "x"
            shutil.rmtree(d, ignore_errors=True)
            assert v.verify_bundle(out, root, target="rpi4", installed=None, extract_to=d).ok

        rows = [("floor: sha256 of the file", best(floor)), ("glue: tarfile extract + sha256", best(glue)),
                ("edgeops verify", best(verify)), ("edgeops verify + extract", best(verify_x))]
        msize, bsize = model.stat().st_size, out.stat().st_size
        print(f"model {msize / 2**20:.1f} MiB, bundle {bsize / 2**20:.1f} MiB "
              f"(+{(bsize - msize) / 1024:.1f} KiB: manifest, roots, reference vectors, headers); "
              f"build {t_build:.2f} s (includes the reference run)")
        print(f"{'best of ' + str(ROUNDS):<34} {'seconds':>8} {'MiB/s':>8} {'vs floor':>9}")
        for name, s in rows:
            print(f"{name:<34} {s:8.3f} {bsize / 2**20 / s:8.0f} {s / rows[0][1]:8.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
