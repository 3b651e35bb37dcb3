"""Building the FlexiQ artifact: the rewrite (flexiq_tvm.transform.FlexiQRewrite), the target's
build and the manifest; the compile half of the API (api.py re-exports it), kept below the stages
so that evaluation, tuning and recovery can compile without importing api."""
from __future__ import annotations

import json
import os
from typing import Optional
import tvm
from tvm import relax
from .._version import __version__
from ..frontend.model import FloatModel, load_model
from ..passes.flexiq_rewrite import flexiq_rewrite
from ..passes.rewrite_pass import FlexiQRewrite
from ..quant.plan import Plan, PlanError
from .compiled import ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST_FUNC, CompiledModel
from ..targets import get_target


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


def compile_float(model, batch_size: int = 1, target=None):
    """TVM's default FP32 build of the same model (the baseline in reports), as a VM."""
    from ..calibrate.stats import build_float

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
    from ..passes.tap_outputs import TapOutputs, flexiq_layer_taps

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
