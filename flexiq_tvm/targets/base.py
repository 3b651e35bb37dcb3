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

        `tuning_db`: a tuning database directory (`flexiq tune`), or None: a kernel with a record
        gets the record's schedule, the others this target's hand schedule (named in one warning)."""
        app = None
        if tuning_db is not None:
            from ..tuning.apply import AppliedDatabase, open_database

            standalone = not isinstance(tuning_db, AppliedDatabase)
            app = open_database(tuning_db, self.tvm_target)
        out = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs:
                if app is None:
                    func = self.schedule_kernel(func)
                else:
                    func = app.schedule_kernel(gv.name_hint, func, self.schedule_kernel)
                func = func.with_attr("op_pattern", 8)  # kOpaque
            out[gv] = func
        new = tvm.IRModule(out, attrs=mod.attrs)
        if app is not None and standalone:
            app.warn()
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
        default pipeline for the target. With `tuning_db` (a directory written by `flexiq tune`):
        the kernels' tuned schedules, and the other PrimFuncs' records applied after FuseTIR
        (MetaScheduleApplyDatabase); one warning lists the tasks without a record."""
        if tuning_db is None:
            return tvm.transform.Sequential([self.schedule_pass(tuning_db),
                                             relax.get_default_pipeline(self.tvm_target)])
        from ..tuning.apply import open_database

        app = open_database(tuning_db, self.tvm_target)
        return tvm.transform.Sequential([self.schedule_pass(app), app.pipeline()])

    def build(self, mod: tvm.IRModule, tuning_db=None):
        return tvm.compile(mod, target=self.tvm_target, relax_pipeline=self.pipeline(tuning_db))

    def device(self):
        kind = self.tvm_target.kind.name
        return tvm.cpu() if kind in ("llvm", "c") else tvm.device(kind, 0)
