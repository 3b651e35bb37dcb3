"""Builders and runners: where candidates are compiled and where they are measured.

The builder compiles the already-scheduled candidate with ``tvm.tirx.build`` and nothing else:
MetaSchedule's default build imports ``tvm.s_tir.tensor_intrin`` in every fresh worker (about
40 s on a 2-core machine, past the build timeout). The FlexiQ kernels' VNNI intrinsic needs no
registration there: a scheduled candidate already holds the tensorized body."""
from __future__ import annotations

from typing import Optional, Tuple

from ..errors import FlexiQError


def fast_build(mod, target, _params):
    """``f_build`` of the builder workers: build the scheduled module as it is."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def make_builder(max_workers: int = 2, timeout_sec: float = 120.0):
    return _persistent_builder_class()(max_workers=max_workers, timeout_sec=timeout_sec)


_BUILDER_CLS = None


def _persistent_builder_class():
    """MetaSchedule's LocalBuilder starts fresh worker processes for every batch (each imports
    TVM: seconds on a loaded 2-core machine); this one keeps its workers, recycled after 64 builds."""
    global _BUILDER_CLS
    if _BUILDER_CLS is not None:
        return _BUILDER_CLS
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PersistentBuilder(PyBuilder):
        def __init__(self, max_workers: int = 2, timeout_sec: float = 120.0):
            super().__init__()
            self.max_workers = int(max_workers)
            self.timeout_sec = float(timeout_sec)
            self.pool = None

        def build(self, build_inputs):
            if self.pool is None:
                self.pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec,
                                              maximum_process_uses=64)
            results = []
            args = [(fast_build, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            for r in self.pool.map_with_error_catching(lambda x: _worker_func(*x), args):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, "build failed:\n" + str(r.value)))
            return results

        def shutdown(self):
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None

    _BUILDER_CLS = PersistentBuilder
    return _BUILDER_CLS


def _alloc_args(device, args_info, alloc_repeat):
    """Candidate arguments: random floats, and ZERO integers: FlexiQ kernels read counts, orders
    and shift tables from their integer inputs, and random ones index out of bounds."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    out = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            # ["TENSOR", dtype, shape] (workers receive the JSON form)
            _, dtype, shape = info.as_json() if hasattr(info, "as_json") else info
            shape = [int(d) for d in shape]
            if "float" in str(dtype):
                data = rng.standard_normal(shape).astype(str(dtype))
            else:
                data = np.zeros(shape, dtype=str(dtype))
            arr = tvm.runtime.empty(shape, str(dtype), device)
            arr.copyfrom(data)
            args.append(arr)
        out.append(args)
    return out


def local_alloc_argument(device, args_info, alloc_repeat):
    # (in the runner's worker process, before it runs a candidate: an AMX kernel needs the
    # process's permission for the tile state, or the worker dies with SIGILL)
    from ..schedules.x86_amx import request_amx_permission

    request_amx_permission()
    return _alloc_args(device, args_info, alloc_repeat)


def rpc_alloc_argument(session, device, args_info, alloc_repeat):
    return _alloc_args(device, args_info, alloc_repeat)


def parse_tracker(text) -> Tuple[str, int]:
    """``HOST:PORT`` of an RPC tracker."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        return str(text[0]), int(text[1])
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FlexiQError(f"--rpc-tracker: expected HOST:PORT, got {text!r}")
    return host, int(port)


def evaluator_config(number: int = 3, repeat: int = 1, min_repeat_ms: int = 20, flush_cache: bool = False):
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                     enable_cpu_cache_flush=flush_cache)


def make_runner(rpc_tracker=None, rpc_key: Optional[str] = None, timeout_sec: float = 60.0,
                max_workers: Optional[int] = None, evaluator=None):
    """A LocalRunner, or an RPCRunner that asks the tracker for devices registered under ``rpc_key``
    (each candidate runs on whichever device the tracker hands out)."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = evaluator or evaluator_config()
    if rpc_tracker is None:
        if rpc_key is not None:
            raise FlexiQError("--rpc-key needs --rpc-tracker HOST:PORT")
        return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=evaluator,
                                     f_alloc_argument=local_alloc_argument)
    if not rpc_key:
        raise FlexiQError("--rpc-tracker needs --rpc-key KEY (the key the devices registered with)")
    host, port = parse_tracker(rpc_tracker)
    check_tracker(host, port, rpc_key)
    cfg = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                              session_priority=1, session_timeout_sec=int(timeout_sec))
    return ms.runner.RPCRunner(rpc_config=cfg, evaluator_config=evaluator, max_workers=max_workers,
                               f_alloc_argument=rpc_alloc_argument)


def check_tracker(host: str, port: int, key: str) -> int:
    """Fail early, with the reason, when the tracker is unreachable or has no device for ``key``;
    returns the number of free devices under the key."""
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as e:  # noqa: BLE001
        raise FlexiQError(f"cannot reach the RPC tracker at {host}:{port}: {e}") from None
    free = 0
    for item in summary.get("server_info", []):
        parts = str(item.get("key", "")).split(":")
        if len(parts) > 1 and parts[1] == key:
            free += 1
    queue = summary.get("queue_info", {}).get(key)
    if free == 0 and not queue:
        raise FlexiQError(f"the RPC tracker at {host}:{port} has no device registered under key {key!r} "
                          f"(start them with: python -m tvm.exec.rpc_server --tracker={host}:{port} --key={key})")
    return free
