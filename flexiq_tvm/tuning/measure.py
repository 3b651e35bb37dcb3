"""Measuring fixed schedules (one-point spaces) with MetaSchedule's builder and runner, without
its search: the record lands in the database exactly as a searched one would."""
from __future__ import annotations

import math
import shutil
import os
from typing import List, Optional, Tuple


def measure_schedules(items, target, builder, runner, database) -> List[Tuple[Optional[float], Optional[str]]]:
    """items: [(task, schedule)]. Builds and runs every schedule, commits a tuning record for each
    success; returns (mean seconds, error) per item."""
    from tvm.s_tir import meta_schedule as ms

    if not items:
        return []
    bres = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in items])
    out: List[Tuple[Optional[float], Optional[str]]] = [(None, None)] * len(items)
    run_idx, rin = [], []
    for i, ((task, sch), b) in enumerate(zip(items, bres)):
        if b.error_msg is not None:
            out[i] = (None, f"build failed: {b.error_msg.strip().splitlines()[-1][:200]}")
            continue
        run_idx.append(i)
        rin.append(ms.runner.RunnerInput(b.artifact_path, "cpu" if target.kind.name in ("llvm", "c") else target.kind.name,
                                         ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])))
    futures = runner.run(rin) if rin else []
    for i, fut in zip(run_idx, futures):
        task, sch = items[i]
        r = fut.result()
        if r.error_msg is not None or not r.run_secs:
            out[i] = (None, f"run failed: {(r.error_msg or 'no result').strip().splitlines()[-1][:200]}")
        else:
            secs = [float(s) for s in r.run_secs]
            wl = database.commit_workload(task.mod)
            database.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, wl, r.run_secs, target, ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))
            out[i] = (sum(secs) / len(secs), None)
    for b in bres:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return out


def finite(x) -> bool:
    return x is not None and math.isfinite(x)
