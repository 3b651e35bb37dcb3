"""An Open Inference Protocol (KServe v2) HTTP server around a `ServingLoop`.

Standard library only (`http.server`, one thread per connection, HTTP/1.1 keep-alive), so that
`pip install flexiq-tvm` can serve; standard clients (`tritonclient.http`, `curl`, KServe's) work
unchanged, including the binary tensor extension that `tritonclient` uses by default.

Endpoints (KServe v2 and ours):
    GET  /v2/health/live | /v2/health/ready          200 when up
    GET  /v2                                          server metadata
    GET  /v2/models/{name}[/versions/{v}]             model metadata (input "input" FP32 [-1, ...])
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer      JSON tensors or the binary extension
    GET  /metrics                                     Prometheus text: ratio, queue, per-ratio counts,
                                                      latency quantiles, switch overhead
    GET  /admin/ratio, POST /admin/ratio {"ratio": 0.5 | null}   read / pin (null: back to the policy)

Every malformed request gets a 400 (404 for an unknown model or path, 413 for a body over the
limit) with {"error": reason}; nothing a client sends can stop the server. A client that
disconnects while its request waits has that request cancelled (the socket is polled while
waiting) and only that request is lost.
"""
from __future__ import annotations

import gzip
import json
import re
import select
import socket
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np

from .._version import __version__
from ..errors import DataError, FlexiQError
from .controller import ControllerError
from .loop import ServingLoop

INPUT_NAME = "input"
OUTPUT_NAME = "output"
MAX_BODY_BYTES = 64 << 20
MAX_REQUEST_SAMPLES = 1024
_MODEL_RE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")

# KServe v2 datatype -> numpy; only FP32 is accepted for the input, the others are named in errors
_DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
           "FP32": np.float32, "FP64": np.float64}


class BadRequest(Exception):
    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


def parse_infer_request(body: bytes, header_len: Optional[int], input_shape) -> tuple:
    """A KServe v2 infer body -> (input array, request id, binary output wanted); BadRequest names the fault.

    `header_len`: the Inference-Header-Content-Length header (binary tensor extension) or None."""
    if header_len is not None:
        if not 0 <= header_len <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {header_len} exceeds the body ({len(body)} bytes)")
        head, binary = body[:header_len], body[header_len:]
    else:
        head, binary = body, b""
    try:
        req = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("request body must be a JSON object with 'inputs'")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise BadRequest(f"'inputs' must be a list of exactly one tensor named {INPUT_NAME!r}")
    t = inputs[0]
    if not isinstance(t, dict):
        raise BadRequest("inputs[0] must be an object with name, shape, datatype and data")
    if t.get("name") != INPUT_NAME:
        raise BadRequest(f"unknown input {t.get('name')!r}; this model's input is {INPUT_NAME!r}")
    dt = t.get("datatype")
    if dt != "FP32":
        known = "" if dt in _DTYPES else " (not a KServe v2 datatype)"
        raise BadRequest(f"input datatype {dt!r}{known}: this model takes FP32")
    shape = t.get("shape")
    want = tuple(input_shape)
    if (not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
            or len(shape) != len(want) + 1 or tuple(shape[1:]) != want or not 1 <= shape[0] <= MAX_REQUEST_SAMPLES):
        raise BadRequest(f"input shape {shape!r} does not match [N, {', '.join(map(str, want))}] "
                         f"with 1 <= N <= {MAX_REQUEST_SAMPLES}")
    count = int(np.prod(shape))
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("inputs[0].parameters must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(binary) or size != 4 * count:
            raise BadRequest(f"binary_data_size {size!r}: shape {shape} in FP32 needs {4 * count} bytes, "
                             f"the body carries {len(binary)} after the JSON header")
        x = np.frombuffer(binary, dtype="<f4").reshape(shape)
    else:
        if binary:
            raise BadRequest("binary data after the JSON header but no binary_data_size on the input")
        data = t.get("data")
        if not isinstance(data, list):
            raise BadRequest("inputs[0].data must be a list of numbers (or use the binary extension)")
        try:
            x = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError):
            raise BadRequest("inputs[0].data holds something that is not a number") from None
        if x.dtype == object or x.size != count:
            raise BadRequest(f"inputs[0].data has {x.size} values; shape {shape} needs {count}")
        if np.any(np.abs(x[np.isfinite(x)]) > np.finfo(np.float32).max):
            raise BadRequest("inputs[0].data has values outside the FP32 range")
        x = x.reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise BadRequest("input contains NaN or infinity")
    binary_out = bool((req.get("parameters") or {}).get("binary_data_output", False)) \
        if isinstance(req.get("parameters") or {}, dict) else False
    outs = req.get("outputs")
    if outs is not None:
        if not isinstance(outs, list) or not all(isinstance(o, dict) for o in outs):
            raise BadRequest("'outputs' must be a list of objects")
        for o in outs:
            if o.get("name") != OUTPUT_NAME:
                raise BadRequest(f"unknown output {o.get('name')!r}; this model's output is {OUTPUT_NAME!r}")
            p = o.get("parameters") or {}
            if isinstance(p, dict) and "binary_data" in p:
                binary_out = bool(p["binary_data"])
    rid = req.get("id")
    return x, rid if isinstance(rid, str) else None, binary_out


def encode_infer_response(name: str, y: np.ndarray, ratio: float, rid: Optional[str], binary: bool,
                          extra: Optional[dict] = None) -> tuple:
    """(body bytes, content type, extra headers) of an infer response carrying `y` (FP32)."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    out = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(y.shape)}
    resp = {"model_name": name, "model_version": "1", "outputs": [out],
            "parameters": {"flexiq_ratio": ratio, **(extra or {})}}
    if rid is not None:
        resp["id"] = rid
    if binary:
        raw = y.astype("<f4").tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(resp).encode()
        return head + raw, "application/octet-stream", {"Inference-Header-Content-Length": len(head)}
    out["data"] = y.reshape(-1).tolist()
    return json.dumps(resp).encode(), "application/json", {}


class InferenceServer:
    """Serves one `ServingLoop` under `name` on (host, port); port 0 picks a free one."""

    def __init__(self, loop: ServingLoop, name: str, host: str = "127.0.0.1", port: int = 8000,
                 request_timeout_s: float = 60.0, quiet: bool = True):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name or ""):
            raise FlexiQError(f"model name {name!r}: use letters, digits, '_', '.' or '-'")
        self.loop = loop
        self.name = name
        self.request_timeout_s = request_timeout_s
        self.quiet = quiet
        self.errors = {"400": 0, "404": 0, "413": 0, "500": 0, "503": 0}
        self.disconnects = 0
        cm = loop.cm
        y = cm(np.zeros((1,) + tuple(cm.input_shape), np.float32))   # output shape, and a warm artifact
        self.output_shape = tuple(y.shape[1:])
        self.output_dtype = y.dtype
        handler = type("Handler", (_Handler,), {"server_obj": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "InferenceServer":
        """Starts the loop and serves in a background thread (tests, examples)."""
        self.loop.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="flexiq-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.loop.start()
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()
        self.loop.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ---- protocol bodies -------------------------------------------------------------------------
    def model_metadata(self) -> dict:
        return {"name": self.name, "versions": ["1"], "platform": f"flexiq-tvm-{self.loop.cm.target}",
                "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *self.loop.cm.input_shape]}],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, *self.output_shape]}],
                "parameters": {"ratios": self.loop.levels, "max_batch": self.loop.max_batch,
                               "slo_ms": self.loop.controller.slo_s * 1e3}}

    def parse_infer(self, body: bytes, header_len: Optional[int]) -> tuple:
        return parse_infer_request(body, header_len, self.loop.cm.input_shape)

    def metrics_text(self) -> str:
        s = self.loop.stats()
        lines = []

        def m(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                lab = ("{" + ",".join(f'{k}="{val}"' for k, val in labels.items()) + "}") if labels else ""
                lines.append(f"{name}{lab} {v}")

        m("flexiq_ratio", "gauge", "4-bit MAC ratio of the most recent batch", [({}, s["ratio"])])
        m("flexiq_ratio_pinned", "gauge", "1 when an admin pinned the ratio", [({}, int(s["pinned"] is not None))])
        m("flexiq_queue_length", "gauge", "samples waiting", [({}, s["queue_length"])])
        m("flexiq_slo_seconds", "gauge", "latency objective", [({}, s["slo_s"])])
        m("flexiq_arrival_rate", "gauge", "samples per second over the rate window", [({}, "NaN" if s["arrival_rate"] is None else s["arrival_rate"])])
        m("flexiq_requests_total", "counter", "requests served per ratio",
          [({"ratio": repr(r)}, v) for r, v in s["requests"].items()])
        m("flexiq_samples_total", "counter", "samples served per ratio",
          [({"ratio": repr(r)}, v) for r, v in s["samples"].items()])
        m("flexiq_batches_total", "counter", "batches run per ratio",
          [({"ratio": repr(r)}, v) for r, v in s["batches"].items()])
        m("flexiq_ratio_switches_total", "counter", "controller level changes", [({}, s["switches"])])
        m("flexiq_switch_overhead_seconds", "gauge", "controller decision + set_ratio per batch",
          [({"stat": k}, v) for k, v in s["switch_overhead_s"].items()])
        m("flexiq_cancelled_total", "counter", "requests dropped because the client left", [({}, s["cancelled"])])
        m("flexiq_errors_total", "counter", "error responses by status",
          [({"status": k}, v) for k, v in self.errors.items()])
        if "latency_s" in s:
            m("flexiq_request_latency_seconds", "summary", "queue + batch latency of recent requests",
              [({"quantile": q}, s["latency_s"][k]) for q, k in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))])
        return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in two writes: with Nagle on, the body waits for the client's delayed
    # ACK (~40 ms on Linux), which would dwarf a sub-millisecond model
    disable_nagle_algorithm = True
    server_obj: InferenceServer = None  # set per server by InferenceServer
    server_version = f"flexiq-tvm/{__version__}"

    def log_message(self, fmt, *args):  # noqa: D401  quiet unless asked
        if not self.server_obj.quiet:
            super().log_message(fmt, *args)

    # ---- plumbing --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: Optional[dict] = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            self.server_obj.disconnects += 1
            self.close_connection = True

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, msg: str):
        key = str(status)
        self.server_obj.errors[key] = self.server_obj.errors.get(key, 0) + 1
        self._json(status, {"error": msg})

    def _body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te and te.lower() != "identity":
            self.close_connection = True
            raise BadRequest(f"Transfer-Encoding {te!r} is not supported; send Content-Length")
        cl = self.headers.get("Content-Length")
        if cl is None:
            self.close_connection = True
            raise BadRequest("missing Content-Length")
        try:
            n = int(cl)
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"Content-Length {cl!r} is not a number") from None
        if n < 0:
            self.close_connection = True
            raise BadRequest(f"Content-Length {n} is negative")
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"body of {n} bytes is over the {MAX_BODY_BYTES} byte limit", 413)
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise BadRequest(f"body ended after {len(data)} of {n} bytes")
        enc = (self.headers.get("Content-Encoding") or "identity").lower()
        try:
            if enc == "gzip":
                data = gzip.decompress(data)
            elif enc == "deflate":
                data = zlib.decompress(data)
            elif enc != "identity":
                raise BadRequest(f"Content-Encoding {enc!r} is not supported (gzip, deflate)")
        except (OSError, zlib.error, EOFError) as e:
            raise BadRequest(f"body is not valid {enc}: {e}") from None
        return data

    def _client_gone(self) -> bool:
        """True when the peer closed its end (readable with nothing to read)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ---- routes ----------------------------------------------------------------------------------
    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def _route(self, method: str):
        srv = self.server_obj
        path = self.path.split("?", 1)[0]
        try:
            body = self._body() if method in ("POST", "PUT") else b""
            if path in ("/v2/health/live", "/v2/health/ready") and method == "GET":
                return self._send(200, b"")
            if path in ("/v2", "/v2/") and method == "GET":
                return self._json(200, {"name": "flexiq-tvm", "version": __version__,
                                        "extensions": ["binary_tensor_data"]})
            if path == "/metrics" and method == "GET":
                return self._send(200, srv.metrics_text().encode(), "text/plain; version=0.0.4")
            if path == "/admin/ratio":
                if method == "GET":
                    return self._json(200, srv.loop.controller.state())
                if method == "POST":
                    return self._admin_ratio(body)
                raise BadRequest(f"{method} /admin/ratio: use GET or POST", 405)
            mm = _MODEL_RE.match(path)
            if not mm:
                raise BadRequest(f"no route {method} {path}", 404)
            name, version, action = mm.groups()
            if name != srv.name:
                raise BadRequest(f"unknown model {name!r} (this server serves {srv.name!r})", 404)
            if version not in (None, "1"):
                raise BadRequest(f"model {name!r} has no version {version!r} (only '1')", 404)
            if action is None and method == "GET":
                return self._json(200, srv.model_metadata())
            if action == "/ready" and method == "GET":
                return self._send(200, b"")
            if action == "/infer" and method == "POST":
                return self._infer(body)
            raise BadRequest(f"no route {method} {path}", 404 if method in ("GET", "POST") else 405)
        except BadRequest as e:
            self._error(e.status, str(e))
        except Exception as e:  # noqa: BLE001  never let one request take the server down
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    def _admin_ratio(self, body: bytes):
        try:
            req = json.loads(body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(req, dict) or "ratio" not in req:
            raise BadRequest('send {"ratio": <one of the served levels>} to pin, {"ratio": null} to release')
        r = req["ratio"]
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))):
            raise BadRequest(f"ratio {r!r} is not a number or null")
        try:
            self.server_obj.loop.controller.pin(None if r is None else float(r))
        except ControllerError as e:
            raise BadRequest(str(e)) from None
        self._json(200, self.server_obj.loop.controller.state())

    def _infer(self, body: bytes):
        srv = self.server_obj
        hl = self.headers.get("Inference-Header-Content-Length")
        try:
            header_len = None if hl is None else int(hl)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length {hl!r} is not a number") from None
        x, rid, binary_out = srv.parse_infer(body, header_len)
        try:
            fut = srv.loop.submit(x)
        except DataError as e:
            raise BadRequest(str(e)) from None
        except FlexiQError as e:
            raise BadRequest(str(e), 503) from None
        waited = 0.0
        while True:                                   # poll the socket: a client that left cancels
            try:
                y, ratio = fut.result(timeout=0.05)
                break
            except TimeoutError:
                waited += 0.05
                if self._client_gone():
                    fut.cancel()
                    srv.disconnects += 1
                    self.close_connection = True
                    return
                if waited > srv.request_timeout_s:
                    fut.cancel()
                    raise BadRequest(f"no answer within {srv.request_timeout_s} s (server overloaded)", 503)
            except FlexiQError as e:
                raise BadRequest(str(e), 503) from None
        data, ctype, headers = encode_infer_response(srv.name, y, ratio, rid, binary_out)
        return self._send(200, data, ctype, headers)
