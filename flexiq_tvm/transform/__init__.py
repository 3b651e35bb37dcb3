"""FlexiQ inside a TVM user's own Relax pipeline (the public pass API, laid out like `tvm.relax.transform`).

    import flexiq_tvm as fq
    from flexiq_tvm import transform as fqt

    mod = relax.frontend.onnx.from_onnx(onnx_model)
    mod = tvm.transform.Sequential([relax.transform.FoldConstant(), ..., relax.transform.FuseOps()])(mod)
    mod = fqt.FlexiQRewrite(plan, batch_size=1)(mod)              # the plan's layers -> FlexiQ layers
    ex = tvm.compile(mod, target=tgt, relax_pipeline=fq.get_pipeline(tgt))
    vm = relax.VirtualMachine(ex, dev)
    y = vm["main"](x, *plan.runtime_args(0.5, dev, vm=vm))        # the ratio travels as VM arguments

Passes (module passes, opt_level 0, TVM naming):
  FlexiQRewrite(plan, batch_size=1, params=None)   find the plan's layers in any module (constants or
                                                   bound params; inside FuseOps / FuseOpsByPattern /
                                                   BYOC functions, which are un-fused) and rewrite them
  ScheduleFlexiQKernels(target, tuning_db=None)    the target's schedules for the FlexiQ kernels
  get_pipeline(target, tuning_db=None)             ScheduleFlexiQKernels + TVM's default pipeline for the
                                                   target (what fq.compile builds with)
Run-time contract: `Plan.runtime_args(ratio, device, vm=vm)` / `Plan.runtime_arrays(ratio)`: `counts`
(int32, per layer) then, for plans with bias corrections, `bias_row` (int32, (1,)); llvm builds (whose
pipeline hoists the weight lowering) then take the tuple `vm["flexiq_lower_weights"](counts)` returns,
which `runtime_args(..., vm=vm)` appends (call it once per ratio change, not per inference).
"""
from __future__ import annotations

from typing import Optional

import tvm

from ..passes.flexiq_rewrite import LAYER_FUNC_PREFIX, flexiq_rewrite
from ..passes.fold_bn import FoldBatchNorm
from ..passes.rewrite_pass import FlexiQRewrite, find_plan_layers, flexiq_rewrite_module, unfuse_layers

__all__ = ["FlexiQRewrite", "ScheduleFlexiQKernels", "get_pipeline", "resolve_target", "FoldBatchNorm",
           "find_plan_layers", "unfuse_layers", "flexiq_rewrite", "flexiq_rewrite_module", "LAYER_FUNC_PREFIX"]


def resolve_target(target, **options):
    """A FlexiQ target object from a name ("llvm", "cuda", "npu"), a `tvm.target.Target` (its kind
    picks the FlexiQ target, which then compiles for exactly that target) or a FlexiQ target."""
    from ..targets import get_target
    from ..targets.base import FlexiQTarget

    if isinstance(target, FlexiQTarget):
        if options:
            raise ValueError("target options apply to a target name or tvm.target.Target, not to a target object")
        return target
    if isinstance(target, tvm.target.Target):
        return get_target(target.kind.name, tvm_target=target, **options)
    if isinstance(target, dict):
        t = tvm.target.Target(target)
        return get_target(t.kind.name, tvm_target=t, **options)
    return get_target(str(target), **options)


def ScheduleFlexiQKernels(target, tuning_db=None, **target_options) -> tvm.transform.Pass:  # noqa: N802
    """Module pass: every FlexiQ kernel (PrimFunc with a `flexiq.kernel` attribute) gets `target`'s
    schedule (or the tuned one from `tuning_db`) and is marked opaque, so TVM's FuseOps/FuseTIR
    leave it as scheduled. Run it after FlexiQRewrite and before TVM's own lowering."""
    return resolve_target(target, **target_options).schedule_pass(tuning_db)


def get_pipeline(target, tuning_db=None, **target_options) -> tvm.transform.Pass:
    """The `relax_pipeline` for `tvm.compile` on a FlexiQ-rewritten module: the target's FlexiQ kernel
    schedules, then TVM's default pipeline for the target (for the NPU: its BYOC partitioning and
    codegen too), i.e. exactly what `fq.compile` builds with. Compile with the same target:
    `tvm.compile(mod, target=resolve_target(t).tvm_target, relax_pipeline=get_pipeline(t))`."""
    tgt = resolve_target(target, **target_options)
    db = tuning_db if tuning_db is not None else getattr(tgt, "tuning_db", None)
    lower = _lowering_pass(tgt, db)
    pipe = tgt.pipeline(db)
    return pipe if lower is None else tvm.transform.Sequential([lower, pipe], name="FlexiQPipeline")


def _lowering_pass(tgt, tuning_db) -> Optional[tvm.transform.Pass]:
    """The step a target's `build` runs before its pipeline (cuda: tensor-core layer functions; npu:
    BYOC partitioning and codegen), as a module pass; None for targets without one (llvm)."""
    import inspect

    lower = getattr(tgt, "lower", None)
    if lower is None:
        return None
    takes_db = len(inspect.signature(lower).parameters) >= 2
    db = tuning_db

    @tvm.transform.module_pass(opt_level=0, name=f"FlexiQLower_{tgt.name}")
    def _lower(mod, _ctx):
        return lower(mod, db) if takes_db else lower(mod)

    return _lower
