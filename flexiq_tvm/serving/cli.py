"""`flexiq serve model.so --slo-ms 50 [--port 8000] [--name NAME] [--max-batch 8]`."""
from __future__ import annotations

import argparse
import os
import signal


def _positive(kind):
    def f(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return f


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("serve", help="serve an artifact over HTTP (KServe v2 / Open Inference Protocol) "
                              "with a load-following ratio controller")
    s.add_argument("artifact", help="a .so written by `flexiq compile` or cm.export")
    s.add_argument("--slo-ms", type=_positive(float), required=True, help="latency objective per request (ms)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port; default 8000)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--name", default=None, help="model name in the URLs (default: the artifact's file stem)")
    s.add_argument("--max-batch", type=_positive(int), default=8, help="samples per batch (default 8)")
    s.add_argument("--max-wait-ms", type=float, default=None,
                   help="longest a request waits for its batch to fill (default: SLO/20, at most 1 ms)")
    s.add_argument("--ratios", default=None, help="comma-separated levels to choose from (default: the plan's)")
    s.add_argument("--pin", type=float, default=None, help="start pinned at this ratio (POST /admin/ratio to change)")
    s.add_argument("--verbose", action="store_true", help="log every HTTP request")
    s.set_defaults(func=run)
    return s


def build(args):
    """The server for parsed `args` (not started); separate from `run` so tests can use it."""
    from ..runtime.compiled import load_artifact
    from .loop import ServingLoop
    from .server import InferenceServer

    cm = load_artifact(args.artifact)
    levels = None
    if args.ratios:
        try:
            levels = [float(v) for v in args.ratios.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"flexiq serve: --ratios: expected numbers separated by commas, got {args.ratios!r}")
    name = args.name or os.path.splitext(os.path.basename(args.artifact))[0]
    loop = ServingLoop(cm, args.slo_ms / 1e3, max_batch=args.max_batch,
                       max_wait_s=None if args.max_wait_ms is None else args.max_wait_ms / 1e3, levels=levels)
    if args.pin is not None:
        loop.controller.pin(args.pin)
    return InferenceServer(loop, name, host=args.host, port=args.port, quiet=not args.verbose)


def run(args) -> None:
    srv = build(args)

    def _term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    print(f"flexiq serve: {srv.name} ({srv.loop.cm.target}, artifact batch {srv.loop.cm.batch_size}) on "
          f"http://{srv.url}  SLO {args.slo_ms:g} ms, max batch {srv.loop.max_batch}, ratios {srv.loop.levels}",
          flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
