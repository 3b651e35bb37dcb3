"""The tuning driver: extract the tasks of a rewritten FlexiQ model, skip those already tuned to
budget, search the others with MetaSchedule (evolutionary search ranked by its XGBoost cost model)
and record everything in the on-disk database."""
from __future__ import annotations

import hashlib
import inspect
import os
import time
import warnings
from typing import Optional, Sequence

from ..errors import FlexiQError
from .database import TuningDB, check_db_dir
from .report import TaskResult, TuneReport

TUNE_TARGETS = ("llvm", "cuda", "npu")
DEFAULT_DB = "flexiq_tuning_db"


def _space_tag(task, flexiq_target) -> str:
    """Identifies the design space a ledger entry was tuned in: a FlexiQ kernel's space is its
    schedule file, which may gain tunable choices (an 'exhausted' one-point space must then be
    searched again)."""
    if task.kind != "flexiq":
        return "ms-default"
    import importlib

    mod = importlib.import_module(f"flexiq_tvm.schedules.{flexiq_target.name}")
    with open(mod.__file__, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


def search_target(tvm_target):
    """The target MetaSchedule searches with: a GPU target needs the thread/shared-memory limits
    its schedule rules read (cuda_target(arch) leaves them to the driver); records stay keyed by
    the build's target directory (database.target_key)."""
    import tvm

    if tvm_target.kind.name != "cuda":
        return tvm_target
    cfg = dict(tvm_target.export())
    for k, v in (("max_threads_per_block", 1024), ("max_shared_memory_per_block", 49152),
                 ("thread_warp_size", 32), ("max_num_threads", 1024), ("registers_per_block", 65536)):
        if cfg.get(k) in (None, 0, -1):
            cfg[k] = v
    return tvm.target.Target(cfg)


def _num_cores(tvm_target) -> int:
    n = tvm_target.attrs.get("num-cores") if tvm_target.kind.name == "llvm" else None
    if n:
        return max(1, int(n))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def ratio_note(flexiq_target, ratios) -> str:
    rs = ", ".join(f"{r:g}" for r in ratios)
    if flexiq_target.name == "llvm":
        return (f"tuned once for ratios {rs}: the llvm kernels run one INT8 reduction whatever the ratio "
                "(the per-layer counts are a run-time input), so the best schedule does not depend on it")
    if flexiq_target.name == "cuda":
        return (f"tuned once for ratios {rs}: the CUDA FlexiQ kernels keep their hand schedules (per-level "
                "variants are not tuned) and the other PrimFuncs do not depend on the ratio")
    return f"tuned once for ratios {rs}"


def _best_us(db, mod) -> Optional[float]:
    if not db.has_workload(mod):
        return None
    recs = db.get_top_k(db.commit_workload(mod), 1)
    if not recs or not recs[0].run_secs:
        return None
    secs = [float(s) for s in recs[0].run_secs]
    return sum(secs) / len(secs) * 1e6


def tune_npu_dispatch(**kwargs):
    """``target="npu"``: the NPU's own tuner (``flexiq_tvm.targets.npu.tune.tune_npu``)."""
    try:
        from ..targets.npu.tune import tune_npu
    except ImportError as e:
        raise FlexiQError("tuning for target 'npu' is not available in this build "
                          f"(flexiq_tvm.targets.npu.tune.tune_npu: {e})") from None
    params = inspect.signature(tune_npu).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return tune_npu(**kwargs)


def validate(target: str, trials, db) -> str:
    if target not in TUNE_TARGETS:
        raise ValueError(f"unknown tuning target {target!r}; available: {', '.join(TUNE_TARGETS)}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    return check_db_dir(db)


def tune_module(mod, flexiq_target, db_dir: str, trials: int, *, model_name: str = "model", ratios=(),
                batch_size: int = 1, seed: int = 0, rpc_tracker=None, rpc_key=None, progress: bool = True,
                trials_per_iter: Optional[int] = None, max_total_trials: Optional[int] = None,
                population: int = 256, timeout_sec: float = 120.0) -> TuneReport:
    """Tune the tasks of a rewritten module ``mod`` for ``flexiq_target`` into ``db_dir``.

    trials: measurement budget per task (a task whose ledger shows the budget spent, or whose
    space was measured whole, is skipped); max_total_trials: an optional cap on this run."""
    from tvm.s_tir import meta_schedule as ms

    from .fast_import import import_tensor_intrinsics
    from .progress import TrialProgress
    from .runner import make_builder, make_runner
    from .measure import measure_schedules
    from .space import PARALLEL_MIN_WORK, fused_space, kernel_design_point, kernel_space, output_elements
    from .tasks import extract_tasks

    t0 = time.perf_counter()
    import_tensor_intrinsics()              # what TuneContext imports, without its 25-60 s stack scans
    tdb = TuningDB(db_dir, flexiq_target.tvm_target)
    tvm_target = search_target(flexiq_target.tvm_target)
    tasks = extract_tasks(mod, flexiq_target)
    ledger = tdb.load_ledger()
    report = TuneReport(model=model_name, target=flexiq_target.name, target_key=tdb.key, db=tdb.root,
                        trials_per_task=int(trials), ratios=[float(r) for r in ratios],
                        ratio_note=ratio_note(flexiq_target, ratios), batch_size=int(batch_size), seed=int(seed),
                        rpc=None if rpc_tracker is None else f"{rpc_tracker} key {rpc_key}")
    todo, fixed, results, errors, points, baselines = [], [], {}, {}, {}, []
    for task in tasks:
        res = TaskResult(name=task.name, kind=task.kind, kernel=task.kernel, weight=task.weight, status="tuned")
        results[task.hash] = res
        space = (kernel_space(flexiq_target) if task.kind == "flexiq" else
                 fused_space(tvm_target, small=output_elements(task.mod) < PARALLEL_MIN_WORK))
        if space is None:
            res.status = "not tunable"
            continue
        tag = _space_tag(task, flexiq_target)
        entry = ledger.get(task.hash)
        if entry is not None and entry.get("space") == tag:
            res.trials_total = int(entry.get("trials", 0))
            if entry.get("exhausted"):
                res.status = "space exhausted"
                continue
            if res.trials_total >= trials:
                res.status = "done before"
                continue
        if task.kind == "flexiq":
            sch, searchable, note = kernel_design_point(task, flexiq_target)
            points[task.hash] = sch
            if not searchable:
                res.note = note or "one-point space (no sampling instructions): measured once"
                fixed.append((task, sch, tag))
                continue
        todo.append((task, space, tag))
        if task.kind == "fused" and res.trials_total == 0:
            # the untuned function itself competes: MetaSchedule's candidates are applied only
            # where one measured faster than what the build would otherwise run
            from tvm import s_tir

            baselines.append((task, s_tir.Schedule(task.mod), tag))

    def ledger_add(task, tag, n, exhausted=None):
        e = ledger.setdefault(task.hash, {"name": task.name, "trials": 0, "space": tag})
        if e.get("space") != tag:
            e.update(trials=0, space=tag, exhausted=False)
        e["trials"] = int(e.get("trials", 0)) + int(n)
        e["budget"] = int(trials)
        if exhausted is not None:
            e["exhausted"] = bool(exhausted)
        tdb.save_ledger(ledger)
        return e

    if todo or fixed:
        cores = _num_cores(tvm_target)
        budget = sum(max(1, trials - results[t.hash].trials_total) for t, _, _ in todo)
        if max_total_trials is not None:
            budget = min(budget, max(0, int(max_total_trials) - len(fixed)))
        per_iter = int(trials_per_iter or min(trials, 64))
        builder = make_builder(max_workers=cores, timeout_sec=timeout_sec)
        runner = make_runner(rpc_tracker, rpc_key, timeout_sec=timeout_sec)
        database = tdb.json_database()
        names = [t.name for t, _, _ in todo]

        def on_batch(task_id, n, best):
            task, _, tag = todo[task_id]
            ledger_add(task, tag, n)

        bar = TrialProgress(budget + len(fixed) + len(baselines), names, enabled=progress, on_batch=on_batch)
        try:
            # one-point spaces: measured once, as MetaSchedule's search would record them
            if fixed:
                bar.bar.set_postfix_str(f"{len(fixed)} fixed-schedule kernels", refresh=False)
                for (task, sch, tag), (secs, err) in zip(
                        fixed, measure_schedules([(t, s) for t, s, _ in fixed], tvm_target, builder, runner,
                                                 database)):
                    res = results[task.hash]
                    res.trials = 1
                    if err is not None:
                        # deterministic for a one-point space: not retried until the schedule changes
                        res.status, res.note = "failed", err
                        ledger_add(task, tag, 1, exhausted=True)
                    else:
                        res.trials_total = int(ledger_add(task, tag, 1, exhausted=True)["trials"])
                    bar.bar.update(1)
            if baselines:
                for (task, _, tag), (secs, err) in zip(
                        baselines, measure_schedules([(t, s) for t, s, _ in baselines], tvm_target, builder,
                                                     runner, database)):
                    ledger_add(task, tag, 1)
                    bar.bar.update(1)
            if todo and budget > 0:
                contexts = [ms.TuneContext(mod=task.mod, target=tvm_target, space_generator=space,
                                           search_strategy=ms.search_strategy.EvolutionarySearch(
                                               population_size=population),
                                           task_name=task.name, rand_state=int(seed) + i, num_threads=cores)
                            for i, (task, space, _) in enumerate(todo)]
                callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [bar]
                from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBConfig

                cost_model = ms.cost_model.XGBModel(config=XGBConfig(seed=int(seed)), num_tuning_cores=cores,
                                                    tree_method="auto")
                # fused PrimFuncs in one search; each searchable kernel in its own, so that a
                # TVM error in one kernel's search (see space.replayable) costs only that kernel
                groups = [[i for i, (t, _, _) in enumerate(todo) if t.kind != "flexiq"]]
                groups += [[i] for i, (t, _, _) in enumerate(todo) if t.kind == "flexiq"]
                for group in groups:
                    if not group:
                        continue
                    bar.index = group
                    try:
                        ms.tune_tasks(tasks=[contexts[i] for i in group],
                                      task_weights=[float(todo[i][0].weight) for i in group],
                                      work_dir=tdb.dir,
                                      max_trials_global=sum(max(1, trials - results[todo[i][0].hash].trials_total)
                                                            for i in group),
                                      max_trials_per_task=int(trials), num_trials_per_iter=per_iter,
                                      builder=builder, runner=runner, database=database,
                                      cost_model=cost_model, measure_callbacks=callbacks,
                                      task_scheduler=ms.task_scheduler.GradientBased(seed=int(seed)))
                    except RuntimeError as e:  # a TVM error inside the search: keep what was measured
                        msg = str(e).strip().splitlines()[-1][:300]
                        for i in group:
                            errors[i] = msg
                        warnings.warn(f"MetaSchedule stopped early on {', '.join(names[i] for i in group)}: "
                                      f"{msg}; the records measured so far are kept", RuntimeWarning, stacklevel=2)
            # a kernel whose search failed still gets its hand schedule (default decisions) measured
            retry = [(todo[i][0], points[todo[i][0].hash]) for i in errors if todo[i][0].hash in points]
            for (task, _), (secs, err) in zip(retry, measure_schedules(retry, tvm_target, builder, runner,
                                                                      database)):
                bar.trials[[t.hash for t, _, _ in todo].index(task.hash)] += 1
                ledger_add(task, todo[[t.hash for t, _, _ in todo].index(task.hash)][2], 1)
                bar.bar.update(1)
        finally:
            bar.close()
            try:
                builder.shutdown()
            except Exception:  # noqa: BLE001
                pass
        cap_reached = sum(bar.trials) >= budget
        for i, (task, _, tag) in enumerate(todo):
            res = results[task.hash]
            res.trials = bar.trials[i]
            e = ledger_add(task, tag, 0)
            res.trials_total = int(e["trials"])
            # the search stopped short of the budget on its own: no unmeasured candidate was left
            # stopped short of the budget on its own, or by an error that a rerun would repeat (a
            # change of the kernel's schedule file re-opens it)
            e["exhausted"] = bool(i in errors or (not cap_reached and res.trials_total < trials))
            if i in errors:
                res.note = f"search stopped ({errors[i][:80]}); default decisions measured"
        tdb.save_ledger(ledger)
        report.trials = int(sum(bar.trials)) + len(fixed) + len(baselines)
        # what MetaSchedule wrote must open again: records that do not replay leave the file
        tdb.repair()

    mem = tdb.memory_copy() if tdb.exists else None
    for task in tasks:
        res = results[task.hash]
        if mem is not None and res.status != "not tunable":
            res.best_us = _best_us(mem, task.mod)
    report.tasks = [results[t.hash] for t in tasks]
    report.wall_s = round(time.perf_counter() - t0, 2)
    return report


def tune_model(model, plan, target: str = "llvm", trials: int = 64, db=DEFAULT_DB,
               ratios: Optional[Sequence[float]] = None, batch_size: Optional[int] = None, seed: int = 0,
               rpc_tracker=None, rpc_key: Optional[str] = None, progress: bool = True, **options) -> TuneReport:
    """``flexiq_tvm.tune``: see its docstring in ``api.py``."""
    from ..runtime.build import _as_model, _as_plan, check_plan_model
    from ..passes.flexiq_rewrite import flexiq_rewrite
    from ..targets import get_target

    db_dir = validate(target, trials, db)
    tune_opts = {k: options.pop(k) for k in ("trials_per_iter", "max_total_trials", "population", "timeout_sec")
                 if k in options}
    if target == "cuda" and rpc_tracker is None:
        raise FlexiQError("target 'cuda': measuring candidates needs a GPU, and this machine has none; pass "
                          "--rpc-tracker HOST:PORT --rpc-key KEY (rpc_tracker=..., rpc_key=...) of a GPU farm "
                          "registered with a TVM RPC tracker (see docs/tuning.md)")
    plan = _as_plan(plan)
    model = _as_model(model, plan)
    check_plan_model(plan, model)
    if target == "npu":
        if rpc_tracker is not None:
            raise FlexiQError("target 'npu' is tuned on the NPU simulator here; --rpc-tracker does not apply")
        return tune_npu_dispatch(model=model, plan=plan, db_dir=db_dir, trials=trials, levels=ratios,
                                 batch_size=1 if batch_size is None else batch_size, seed=seed, progress=progress,
                                 **options)
    levels = sorted(float(r) for r in plan.levels)
    if ratios is None:
        ratios = levels
    for r in ratios:
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"ratio {r} is outside [0, 1]")
    batch_size = model.check_batch(model.batch_for(1) if batch_size is None else batch_size)
    tgt = get_target(target, **options)
    mod = flexiq_rewrite(*model.at(batch_size), plan, batch_size)
    return tune_module(mod, tgt, db_dir, trials, model_name=model.name, ratios=ratios, batch_size=batch_size,
                       seed=seed, rpc_tracker=rpc_tracker, rpc_key=rpc_key, progress=progress, **tune_opts)
