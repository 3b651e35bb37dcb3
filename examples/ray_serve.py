"""Scale-out: several replicas of the FlexiQ server behind Ray Serve, each with its own controller.

Every replica loads the same artifact and runs its own `ServingLoop` (queue, dynamic batching,
`RatioController`): a replica sees only the load Ray routes to it, so each one picks its own ratio
from its own queue, which is what the paper's per-accelerator policy is. The HTTP side speaks the
same Open Inference Protocol infer call as `flexiq serve` (request parsing and response encoding
are shared with it), so the same clients and the same load generator drive it:

    pip install 'flexiq-tvm[ray]'
    flexiq compile model.onnx --plan model.flexiq -o model.so --batch-size 8
    python examples/ray_serve.py model.so --replicas 2 --slo-ms 50 --port 8000        # serves until Ctrl-C
    python benchmarks/serving.py live --url 127.0.0.1:8000 --name model --rates 50,100,200   # other shell
    python examples/ray_serve.py model.so --replicas 2 --bench 100 --seconds 10        # both in one process

Routes: POST /v2/models/{name}/infer, GET /v2/health/ready, GET /v2/models/{name} (metadata),
GET /replicas (each replica's ratio, counts and controller state; one replica answers per call).
On a cluster: see README.md, "Serving" (start Ray on each node, then run this with --address auto).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_app(artifact: str, name: str, slo_ms: float, max_batch: int, replicas: int, cpus_per_replica: float):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=256)
    class FlexiQReplica:
        def __init__(self):
            import flexiq_tvm as fq
            from flexiq_tvm.serving import ServingLoop

            self.cm = fq.load_artifact(artifact)
            self.loop = ServingLoop(self.cm, slo_ms / 1e3, max_batch=max_batch).start()
            self.replica = f"{os.getpid()}"
            y = self.cm(np.zeros((1,) + tuple(self.cm.input_shape), np.float32))
            self.out_shape = list(y.shape[1:])

        async def __call__(self, request: Request):
            from flexiq_tvm.serving.server import BadRequest, encode_infer_response, parse_infer_request

            path = request.url.path.rstrip("/")
            try:
                if request.method == "GET" and path in ("/v2/health/ready", "/v2/health/live"):
                    return Response(b"", 200)
                if request.method == "GET" and path == "/replicas":
                    return Response(json.dumps({"replica": self.replica, **self.loop.stats()}, default=str),
                                    200, media_type="application/json")
                if request.method == "GET" and path == f"/v2/models/{name}":
                    meta = {"name": name, "versions": ["1"], "platform": f"flexiq-tvm-{self.cm.target}",
                            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *self.cm.input_shape]}],
                            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, *self.out_shape]}]}
                    return Response(json.dumps(meta), 200, media_type="application/json")
                if request.method == "POST" and path == f"/v2/models/{name}/infer":
                    body = await request.body()
                    hl = request.headers.get("inference-header-content-length")
                    x, rid, binary = parse_infer_request(body, None if hl is None else int(hl), self.cm.input_shape)
                    y, ratio = await asyncio.wrap_future(self.loop.submit(x))
                    data, ctype, headers = encode_infer_response(name, y, ratio, rid, binary,
                                                                 {"flexiq_replica": self.replica})
                    return Response(data, 200, headers={k: str(v) for k, v in headers.items()}, media_type=ctype)
                return Response(json.dumps({"error": f"no route {request.method} {path}"}), 404,
                                media_type="application/json")
            except (BadRequest, ValueError) as e:
                return Response(json.dumps({"error": str(e)}), getattr(e, "status", 400), media_type="application/json")

    return FlexiQReplica.bind()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--name", default=None, help="model name in the URLs (default: the artifact's stem)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--address", default=None, help="Ray cluster address ('auto' on a node of a running cluster)")
    ap.add_argument("--bench", type=float, default=None, metavar="RATE",
                    help="drive it with the open-loop load generator at RATE req/s (Poisson), print, exit")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import ray
    from ray import serve

    name = a.name or os.path.splitext(os.path.basename(a.artifact))[0]
    artifact = os.path.abspath(a.artifact)
    ray.init(address=a.address, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(make_app(artifact, name, a.slo_ms, a.max_batch, a.replicas, a.cpus_per_replica),
              name="flexiq", route_prefix="/")
    url = f"{a.host}:{a.port}"
    print(f"Ray Serve: {a.replicas} FlexiQ replicas of {name} at http://{url}/v2/models/{name}/infer", flush=True)
    if a.bench is None:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        serve.shutdown()
        return
    from flexiq_tvm.serving import poisson_trace
    from flexiq_tvm.serving.loadgen import run_open_loop, summarize_live

    x = np.load(os.path.join(ROOT, "flexiq_tvm", "assets", "fashion_test.npz"))["inputs"][:256].astype(np.float32)
    arr = poisson_trace(a.bench, int(a.bench * a.seconds), a.seed)
    res = run_open_loop(url, name, arr, x)
    s = summarize_live(res, a.slo_ms / 1e3)
    print(json.dumps(s, indent=1))
    import http.client

    seen = {}
    for _ in range(8 * a.replicas):                 # ask until every replica answered once
        c = http.client.HTTPConnection(a.host, a.port, timeout=10)
        c.request("GET", "/replicas")
        r = json.loads(c.getresponse().read())
        c.close()
        seen[r["replica"]] = {k: r[k] for k in ("ratio", "requests", "switches", "switch_overhead_s")}
    print(json.dumps(seen, indent=1, default=str))
    serve.shutdown()


if __name__ == "__main__":
    main()
