"""Code that runs ON a device: standard library + numpy + onnxruntime + cryptography only,
importing nothing from the rest of edgeops (tests run it with edgeops import-blocked).
Modules import each other relatively, so the folder works under any package name.

verifier (bundle signatures, hashes, trust roots), health (reference vectors + latency SLO),
compare (the one output comparison, also used by edgeops.verify), bench_runner (a standalone
script: latency measurement here and on devices)."""
