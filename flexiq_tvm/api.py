"""The Python API: load_model -> quantize -> Plan -> compile -> CompiledModel."""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import tvm
from tvm import relax

from . import __version__
from .calibrate import collect_stats
from .data import load_data
from .frontend.model import FloatModel, load_model
from .passes.flexiq_rewrite import flexiq_rewrite
from .passes.rewrite_pass import FlexiQRewrite
from .quant.build import build_plan
from .quant.plan import Plan, PlanError
from .quant.rounding import check_rounding
from .quant.schedule import STANDARD_LEVELS
from .runtime.compiled import ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST_FUNC, CompiledModel
from .targets import get_target


def _as_model(model, plan: Optional[Plan] = None, input_shape=None) -> FloatModel:
    """A loaded model; a path is loaded at `input_shape`, else at the input shape its plan records
    (dynamic-shape files)."""
    if isinstance(model, FloatModel):
        return model
    if input_shape is None and plan is not None and isinstance(model, (str, os.PathLike)):
        input_shape = plan.meta.get("input_shape")
    return load_model(model, input_shape=None if input_shape is None else tuple(input_shape))


def _as_plan(plan) -> Plan:
    return plan if isinstance(plan, Plan) else Plan.load(plan)


def check_plan_model(plan: Plan, model: FloatModel) -> None:
    """The plan was made for this model, at this input shape (recorded in the plan's meta)."""
    shape = plan.meta.get("input_shape")
    if shape is not None and tuple(shape) != tuple(model.input_shape):
        raise PlanError(f"plan was made for input shape {tuple(shape)}, but {model.source} is loaded with "
                        f"{tuple(model.input_shape)}; load the model with input_shape={tuple(shape)} "
                        f"(--input-shape {','.join(map(str, shape))}) or quantize again")
    plan.check_model(model.fingerprint, model.layer_names, source=model.source)


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

    from .search import SEARCHES, default_search_samples, run_search

    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    check_rounding(rounding)
    from .finetune.config import as_config

    ft_config = as_config(finetune)
    if ft_config is not None:
        from .finetune import require_torch

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
        from .recovery import recover_bias

        recover_bias(model, plan, inputs, samples=search_samples, seed=seed, progress=progress)
    if ft_config is not None:
        from .finetune import finetune_plan

        timings = dict(plan.timings)
        plan = finetune_plan(model, plan, inputs, ft_config, progress=progress)
        plan.timings = {**timings, **plan.timings}
    plan.timings["quantize"] = round(time.perf_counter() - t0, 3)
    return plan


def _with_manifest(mod: tvm.IRModule, manifest: dict) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    with bb.function(MANIFEST_FUNC, []):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(manifest)))
    return bb.get()


def compile(model, plan, target: str = "llvm", batch_size: Optional[int] = None, schedule: bool = True,
            tuning_db=None, **target_options) -> CompiledModel:
    """Compile the FlexiQ model once; the result serves every ratio (`set_ratio`).

    batch_size: samples per call (default 1; for a graph that pins its batch, that batch).
    tuning_db: a directory written by `tune` (`flexiq tune`): the tuned schedules are applied; a
    task without a record keeps today's schedule, and one warning lists those tasks."""
    plan = _as_plan(plan)
    model = _as_model(model, plan)
    check_plan_model(plan, model)
    batch_size = model.check_batch(model.batch_for(1) if batch_size is None else batch_size)
    tgt = get_target(target, schedule=schedule, **target_options)
    if plan.bias_correction and not tgt.supports_bias_rows:
        import warnings

        warnings.warn(f"target {tgt.name!r} does not take per-ratio bias corrections yet; compiling without them "
                      "(re-quantize with recover=False to silence this)", stacklevel=2)
        plan = Plan.loads(plan.dumps())
        plan.bias_correction = {}
    # the same pass a TVM user puts into their own pipeline (flexiq_tvm.transform)
    mod = FlexiQRewrite(plan, batch_size)(model.at(batch_size)[0])
    manifest = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "plan": plan.dumps(),
                "batch_size": int(batch_size), "input_shape": list(model.input_shape), "target": tgt.name,
                "model_name": model.name, "flexiq_tvm": __version__}
    if tuning_db is None:
        ex = tgt.build(_with_manifest(mod, manifest))
    else:
        ex = tgt.build(_with_manifest(mod, manifest), tuning_db=os.fspath(tuning_db))
    return CompiledModel(ex, manifest, tgt.device())


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


def compile_float(model, batch_size: int = 1, target=None):
    """TVM's default FP32 build of the same model (the baseline in reports), as a VM."""
    from .calibrate import build_float

    model = _as_model(model)
    mod, _ = model.at(batch_size)
    main = mod["main"]
    n = main.params[0].ty.shape.values[0]
    if not isinstance(n, tvm.tirx.IntImm):
        mod = tvm.IRModule({"main": main.bind_symbolic_vars({n: int(batch_size)})})
    return build_float(mod, target)


def compile_with_taps(model, plan, batch_size: int = 1, target: str = "llvm", schedule: bool = True,
                      runtime_bias: bool = False, channel_means: bool = False):
    """A debugging build whose `main` returns (output, x_0, y_0, x_1, y_1, ...): every FlexiQ layer's
    float input and output, so each layer can be checked against the reference. Its run-time
    arguments are those of the deployment build (`CompiledModel.runtime_args`), or
    `counts, bias_0, ..., bias_{L-1}` with `runtime_bias=True`. With `channel_means` it returns
    (output, m_0, m_1, ...) instead: each layer's per-output-channel mean over the batch, reduced
    inside the graph, so C floats per layer leave the VM rather than whole feature maps (the
    recovery build; on MobileNetV2 a feature map is 10^5-10^6 floats per image)."""
    from .passes.tap_outputs import TapOutputs, flexiq_layer_taps

    plan = _as_plan(plan)
    model = _as_model(model, plan)
    check_plan_model(plan, model)
    batch_size = model.check_batch(batch_size)
    mod = flexiq_rewrite(*model.at(batch_size), plan, batch_size, runtime_bias=runtime_bias)
    taps = flexiq_layer_taps(mod["main"])
    if channel_means:
        flat = []
        for i in sorted(taps):
            y = taps[i][1]
            axes = [0, 2, 3] if model.specs[i].op == "conv2d" else list(range(y.ty.ndim - 1))
            flat.append(relax.op.mean(y, axis=axes))
    else:
        flat = [e for i in sorted(taps) for e in taps[i]]
    tgt = get_target(target, schedule=schedule)
    # main keeps (x, counts[, bias_row]) and the taps are the layers' own outputs
    tgt.hoist_weights = tgt.fuse_activations = False
    return relax.VirtualMachine(tgt.build(TapOutputs(flat)(mod)), tgt.device())
