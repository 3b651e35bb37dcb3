"""The interface every target implements."""
from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.compute import KERNEL_ATTR


class FlexiQTarget:
    """Schedules the FlexiQ kernels of a rewritten module and builds it with TVM."""

    name = "base"
    # whether the target's lowering accepts the per-ratio bias rows of accuracy recovery
    supports_bias_rows = True

    def __init__(self, tvm_target: tvm.target.Target):
        self.tvm_target = tvm_target

    def schedule_kernel(self, func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
        raise NotImplementedError

    def schedule_kernels(self, mod: tvm.IRModule, tuning_db=None) -> tvm.IRModule:
        """Module pass body: every PrimFunc tagged `flexiq.kernel` gets this target's schedule,
        and is marked opaque so that TVM's fusion leaves it as scheduled.

        `tuning_db`: a tuning database (see `flexiq_tvm.tuning`); not applied yet."""
        out = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs:
                func = self.schedule_kernel(func).with_attr("op_pattern", 8)  # kOpaque
            out[gv] = func
        new = tvm.IRModule(out, attrs=mod.attrs)
        return new

    def schedule_pass(self, tuning_db=None) -> tvm.transform.Pass:
        """`schedule_kernels` as a module pass (what `pipeline` runs first)."""
        target = self

        @tvm.transform.module_pass(opt_level=0, name="ScheduleFlexiQKernels")
        def _schedule(mod, _ctx):
            return target.schedule_kernels(mod, tuning_db)

        return _schedule

    def pipeline(self, tuning_db=None) -> tvm.transform.Pass:
        """The relax pipeline `build` compiles with: the FlexiQ kernel schedules, then TVM's
        default pipeline for the target."""
        return tvm.transform.Sequential([self.schedule_pass(tuning_db),
                                         relax.get_default_pipeline(self.tvm_target)])

    def build(self, mod: tvm.IRModule, tuning_db=None):
        return tvm.compile(mod, target=self.tvm_target, relax_pipeline=self.pipeline(tuning_db))

    def device(self):
        kind = self.tvm_target.kind.name
        return tvm.cpu() if kind in ("llvm", "c") else tvm.device(kind, 0)
