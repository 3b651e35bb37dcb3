"""The Python API: load_model -> quantize -> Plan -> compile -> CompiledModel."""
from __future__ import annotations

import time
from typing import Optional, Sequence

from ._version import __version__
from .calibrate.stats import collect_stats
from .calibrate.data import load_data
from .quant.build import build_plan
from .quant.plan import Plan
from .quant.rounding import check_rounding
from .quant.schedule import STANDARD_LEVELS
from .runtime.build import (  # noqa: F401  (compile machinery; re-exported)
    _as_model,
    _as_plan,
    _with_manifest,
    check_plan_model,
    compile,
    compile_float,
    compile_with_taps,
)


def quantize(model, calib, ratios: Sequence[float] = STANDARD_LEVELS, group_size: int = 16,
             calibrator: str = "percentile", search: str = "evolutionary", seed: int = 0, batch_size: int = 32,
             percentile: float = 99.99, shift_rule: str = "mse", search_samples: Optional[int] = None,
             metric: str = "kl", population: int = 16, generations: int = 20, patience: int = 5,
             curve_points: int = 8, recover: bool = True, rounding: str = "compensated",
             progress: bool = True, finetune=False) -> Plan:
    """Calibrate `model` on `calib` and build its FlexiQ plan (scales, orders, shifts, ratio levels).

    search: "range" lowers every layer at the same pace in value-range order; "sensitivity"
    orders the steps across layers by measured per-layer error curves; "greedy" re-measures the
    model output after every step; "evolutionary" (default) evolves each level's 4-bit group sets,
    nested level by level, seeded by range and greedy (by sensitivity above 256 groups, where
    greedy's one evaluation per group gets expensive). All are seeded and deterministic.
    search_samples: calibration inputs each candidate is scored on (and bias correction measures);
    default: as many as fit in SEARCH_MACS_PER_EVALUATION, between 16 and 512 (512 for the demo
    models, 16 for MobileNetV2, whose whole default pipeline then took 7 minutes on 2 cores).
    recover: per-ratio bias correction after the search (see `recovery.py`).
    rounding: "compensated" (default) picks INT8 weight codes that preserve each layer's output on
    the calibration inputs (`quant/rounding.py`); "nearest" rounds each weight on its own.
    finetune: False (default); True or a `FinetuneConfig` (or a dict of its fields): after the search
    and bias correction, train one set of INT8 codes (plus weight scales and per-level biases) for
    all ratio levels at once against the FP32 model on the calibration inputs (`finetune/`; needs
    torch: pip install 'flexiq-tvm[torch]'). The result is an ordinary plan.
    """
    from tqdm.auto import tqdm

    from .search.driver import SEARCHES, default_search_samples, run_search

    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    check_rounding(rounding)
    from .search.finetune.config import as_config

    ft_config = as_config(finetune)
    if ft_config is not None:
        from .search.finetune import require_torch

        require_torch()               # fail before the (long) search, not after it
    model = _as_model(model)
    if search_samples is None:
        search_samples = default_search_samples(model.specs)
    elif int(search_samples) < 1:
        raise ValueError(f"search_samples must be >= 1, got {search_samples}")
    inputs, _ = load_data(calib, model, what="calibration data")
    t0 = time.perf_counter()
    stats = collect_stats(model, inputs, batch_size=batch_size, seed=seed, progress=progress,
                          grams=rounding == "compensated")
    plan = build_plan(model.specs, stats, ratios=ratios, group_size=group_size, calibrator=calibrator,
                      search="range", seed=seed, percentile=percentile, shift_rule=shift_rule, rounding=rounding,
                      meta={"model": model.name, "calib_samples": int(inputs.shape[0]),
                            "input_shape": list(model.input_shape),
                            "flexiq_tvm": __version__},
                      progress=(lambda it, **kw: tqdm(it, disable=not progress, **kw)))
    run_search(model, plan, inputs, search, seed=seed, samples=search_samples, metric=metric,
               curve_points=curve_points, population=population, generations=generations, patience=patience,
               progress=progress)
    if recover:
        from .search.recovery import recover_bias

        recover_bias(model, plan, inputs, samples=search_samples, seed=seed, progress=progress)
    if ft_config is not None:
        from .search.finetune import finetune_plan

        timings = dict(plan.timings)
        # the source itself when whole photos are to be held out (it knows which crop is whose)
        plan = finetune_plan(model, plan, calib if ft_config.holdout_by_source else inputs, ft_config,
                             progress=progress)
        plan.timings = {**timings, **plan.timings}
    plan.timings["quantize"] = round(time.perf_counter() - t0, 3)
    return plan


def tune(model, plan, target: str = "llvm", trials: int = 64, db="flexiq_tuning_db",
         ratios: Optional[Sequence[float]] = None, batch_size: Optional[int] = None, seed: int = 0,
         rpc_tracker: Optional[str] = None, rpc_key: Optional[str] = None, progress: bool = True, **options):
    """Tune the compiled FlexiQ model's kernels with MetaSchedule into the database directory `db`.

    Tasks: the FlexiQ layer kernels (their space: the target's schedule, whose `sample_*` choices
    are searched) and every other PrimFunc after fusion (MetaSchedule's default space), searched
    by evolutionary search with the XGBoost cost model. trials: measured candidates per task; a
    task the database already holds to that budget is skipped, so an interrupted run resumes. One
    database serves several models, ratios and targets (workloads keyed by structural hash,
    one sub-directory per target). llvm kernels do not depend on the ratio (counts are a run-time
    input): they are tuned once, and the report says so.
    target: "llvm" | "cuda" (needs `rpc_tracker`/`rpc_key` of a GPU farm: no local GPU measuring) |
    "npu" (the NPU's own tuner). rpc_tracker "HOST:PORT" and rpc_key: measure on the devices a TVM
    RPC tracker hands out. Options: arch= (cuda), trials_per_iter=, max_total_trials=,
    population=, timeout_sec=. Returns a `flexiq_tvm.tuning.TuneReport` (`.format()`).
    Apply the result with `compile(..., tuning_db=db)`."""
    from .tuning.tune import tune_model

    return tune_model(model, plan, target=target, trials=trials, db=db, ratios=ratios, batch_size=batch_size,
                      seed=seed, rpc_tracker=rpc_tracker, rpc_key=rpc_key, progress=progress, **options)


