"""A local inference server for apps in other languages: the KServe v2 / Triton REST protocol for
one model, JSON tensors only, on top of `runtime.Runtime` (so every request is recorded, and a
switch is picked up like in-process use). Standard library + numpy (the agent package's rule).

    GET  /v2/health/live      /v2/health/ready      /v2      /v2/models/NAME      /v2/models/NAME/ready
    POST /v2/models/NAME/infer                       (also /v2/models/NAME/versions/V/infer)
         {"inputs": [{"name", "shape", "datatype", "data"}], "outputs": [{"name"}]?, "id"?}

Bound to 127.0.0.1 unless told otherwise: it has no authentication. Errors are {"error": "..."}
with 400 (bad request), 404 (no such model or path) or 500 (the model raised).
Not covered: the binary tensor extension, BYTES tensors, gRPC.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .runtime import Runtime

DTYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
          "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
          "FP32": "float32", "FP64": "float64"}
KSERVE = {v: k for k, v in DTYPES.items()}
ORT_TYPES = {f"tensor({t})": k for k, t in
             (("BOOL", "bool"), ("UINT8", "uint8"), ("INT8", "int8"), ("INT16", "int16"), ("INT32", "int32"),
              ("INT64", "int64"), ("FP16", "float16"), ("FP32", "float"), ("FP64", "double"),
              ("UINT16", "uint16"), ("UINT32", "uint32"), ("UINT64", "uint64"))}
MAX_BODY = 64 << 20


class BadRequest(Exception):
    pass


def decode_inputs(doc) -> dict:
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise BadRequest("the request needs a non-empty 'inputs' list")
    feeds = {}
    for t in doc["inputs"]:
        if not isinstance(t, dict):
            raise BadRequest("each input is an object with name, shape, datatype, data")
        name, shape, dt = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str) or not isinstance(shape, list) or dt not in DTYPES or "data" not in t:
            raise BadRequest(f"input {name!r}: needs name, shape (list), datatype (one of "
                             f"{', '.join(DTYPES)}) and data")
        try:
            arr = np.asarray(t["data"], dtype=DTYPES[dt])
            feeds[name] = arr.reshape([int(s) for s in shape])
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"input {name!r}: data does not fit shape {shape} as {dt} ({exc})") from None
    return feeds


def encode_output(name: str, arr) -> dict:
    a = np.asarray(arr)
    dt = KSERVE.get(str(a.dtype))
    if dt is None:
        raise BadRequest(f"output {name!r} has dtype {a.dtype}, which has no JSON tensor form here")
    data = a.ravel().tolist()
    if a.dtype.kind == "f":     # JSON has no NaN/inf: they travel as null (and the runtime counted them)
        data = [x if x == x and x not in (float("inf"), float("-inf")) else None for x in data]
    return {"name": name, "shape": list(a.shape), "datatype": dt, "data": data}


def make_server(rt: Runtime, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    name = rt.name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):     # quiet: every request is already in the telemetry
            pass

        def _send(self, code: int, doc: dict) -> None:
            body = json.dumps(doc, separators=(",", ":")).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _meta(self) -> dict:
            m = rt.model
            sig = lambda xs: [{"name": x.name, "datatype": ORT_TYPES.get(x.type, x.type),  # noqa: E731
                               "shape": [d if isinstance(d, int) else -1 for d in x.shape]} for x in xs]
            return {"name": name, "versions": [m.version], "platform": "onnxruntime_onnx",
                    "inputs": sig(m.session.get_inputs()), "outputs": sig(m.session.get_outputs())}

        def do_GET(self):  # noqa: N802
            p = self.path.split("?")[0].rstrip("/")
            if p == "/v2/health/live":
                return self._send(200, {"live": True})
            if p in ("/v2/health/ready", f"/v2/models/{name}/ready"):
                return self._send(200, {"ready": True, "name": name, "version": rt.version})
            if p == "/v2":
                from .install import AGENT_VERSION

                return self._send(200, {"name": "edgeops-agent", "version": AGENT_VERSION, "extensions": []})
            if p == f"/v2/models/{name}":
                return self._send(200, self._meta())
            return self._send(404, {"error": f"no such path {p!r} (this server serves model {name!r})"})

        def do_POST(self):  # noqa: N802
            # the body is read first, whatever the answer: an unread body would be taken for the
            # next request on this keep-alive connection
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if not 0 < n <= MAX_BODY:
                self.close_connection = True
                return self._send(400, {"error": f"a request body of 1..{MAX_BODY} bytes is needed (Content-Length {n})"})
            raw = self.rfile.read(n)
            p = self.path.split("?")[0].rstrip("/")
            parts = p.split("/")
            ok = (len(parts) == 5 and parts[1:3] == ["v2", "models"] and parts[4] == "infer") or \
                 (len(parts) == 7 and parts[1:3] == ["v2", "models"] and parts[4] == "versions" and parts[6] == "infer")
            if not ok:
                return self._send(404, {"error": f"no such path {p!r}"})
            if parts[3] != name:
                return self._send(404, {"error": f"no model {parts[3]!r} here (this server serves {name!r})"})
            if len(parts) == 7 and parts[5] != rt.version:
                return self._send(404, {"error": f"version {parts[5]!r} is not loaded (current: {rt.version})"})
            try:
                doc = json.loads(raw)
                feeds = decode_inputs(doc)
                want = [o.get("name") for o in doc.get("outputs") or [] if isinstance(o, dict)] or None
            except (BadRequest, ValueError) as exc:
                return self._send(400, {"error": str(exc)})
            m = rt.model
            try:
                outs = rt.run(feeds, want)
            except Exception as exc:  # noqa: BLE001 - the runtime recorded it; the client hears why
                from .ort import describe

                return self._send(400 if "input" in str(exc).lower() else 500, {"error": describe(exc)})
            names = want or m.outputs
            try:
                body = {"model_name": name, "model_version": m.version,
                        "outputs": [encode_output(k, o) for k, o in zip(names, outs)]}
            except BadRequest as exc:
                return self._send(500, {"error": str(exc)})
            if isinstance(doc.get("id"), str):
                body["id"] = doc["id"]
            return self._send(200, body)

    srv = ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    return srv


def serve(rt: Runtime, host: str, port: int, seconds: float | None = None, ready=None) -> None:
    srv = make_server(rt, host, port)
    if ready is not None:
        ready(srv.server_address)
    if seconds:
        threading.Timer(seconds, srv.shutdown).start()
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        srv.server_close()
