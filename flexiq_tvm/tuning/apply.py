"""Applying a tuning database in a build (``FlexiQTarget.pipeline(tuning_db)``).

FlexiQ kernels: the best record's trace is replayed on the kernel before TVM's passes see it;
without a record the target's hand schedule is used. The other PrimFuncs: TVM's
``MetaScheduleApplyDatabase`` right after FuseTIR. Functions left without a record are named in
ONE warning per build."""
from __future__ import annotations

import os
import warnings
from typing import List, Optional

import tvm

from .database import TuningDB, normalize


class UntunedWarning(UserWarning):
    """A build with a tuning database found no record for some tasks (they keep their default
    schedule)."""


class AppliedDatabase:
    """A tuning database opened for one build and one target (records copied into memory)."""

    def __init__(self, path, target: tvm.target.Target):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tuning database {path} does not exist (run `flexiq tune` first)")
        self.path = path
        self.target = target
        self.tdb = TuningDB(path, target, create=False)
        self.db = self.tdb.memory_copy()
        self.untuned: List[str] = []
        self.tuned: List[str] = []

    # ---- FlexiQ kernels ------------------------------------------------------------------------
    def _query(self, func):
        from tvm.s_tir import meta_schedule as ms  # noqa: F401

        nmod = normalize(func)
        if not self.db.has_workload(nmod):
            return None
        sch = self.db.query_schedule(nmod, self.target, "main")
        if sch is None:
            return None
        out = sch.mod["main"]
        # the trace was replayed on the normalized function: give back the original attributes
        if func.attrs is None or "global_symbol" not in func.attrs:
            out = out.without_attr("global_symbol")
        return out

    def schedule_kernel(self, name: str, func, hand_schedule) -> tvm.tirx.PrimFunc:
        """The kernel with its tuned schedule, else with ``hand_schedule(func)`` (noted as untuned)."""
        try:
            out = self._query(func)
        except Exception:  # noqa: BLE001  (e.g. a tensor intrinsic not registered yet in this process)
            hand_schedule(func)  # registers what the hand schedule uses, then replay again
            try:
                out = self._query(func)
            except Exception:  # noqa: BLE001  a record of an older schedule that no longer replays
                out = None
        if out is None:
            self.untuned.append(name)
            return hand_schedule(func)
        self.tuned.append(name)
        return out

    # ---- the other PrimFuncs -----------------------------------------------------------------
    def note_fused(self, mod: tvm.IRModule) -> None:
        from .tasks import is_kernel

        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or is_kernel(func):
                continue
            if func.attrs is not None and "tir.is_scheduled" in func.attrs:
                continue
            nmod = normalize(func)
            if self.db.has_workload(nmod) and self.db.get_top_k(self.db.commit_workload(nmod), 1):
                self.tuned.append(gv.name_hint)
            else:
                self.untuned.append(gv.name_hint)

    def apply_pass(self) -> tvm.transform.Pass:
        """Note which fused PrimFuncs have records, then MetaScheduleApplyDatabase."""
        from tvm import relax

        app = self

        @tvm.transform.module_pass(opt_level=0, name="FlexiQApplyTuningDatabase")
        def _apply(mod, _ctx):
            app.note_fused(mod)
            with app.target, app.db:
                return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)

        return _apply

    def warn_pass(self) -> tvm.transform.Pass:
        app = self

        @tvm.transform.module_pass(opt_level=0, name="FlexiQWarnUntuned")
        def _warn(mod, _ctx):
            app.warn()
            return mod

        return _warn

    def warn(self) -> None:
        if self.untuned:
            names = sorted(set(self.untuned))
            warnings.warn(f"tuning database {self.path} has no record for {len(names)} of "
                          f"{len(names) + len(set(self.tuned))} tasks on {self.tdb.key}; they keep the default "
                          f"schedule (run `flexiq tune` for this model): {', '.join(names)}", UntunedWarning,
                          stacklevel=2)
        self.untuned = []
        self.tuned = []

    def pipeline(self) -> tvm.transform.Pass:
        """The target's default Relax pipeline with the database applied after FuseTIR."""
        from .tasks import backend_pipeline

        target = self.target
        P = backend_pipeline(target)
        passes = list(P.library_dispatch_passes(target))
        for p in P.legalize_passes(target):
            passes.append(p)
            if p.info.name == "FuseTIR":
                passes.append(self.apply_pass())
        passes += list(P.dataflow_lower_passes(target)) + list(P.finalize_passes(target)) + [self.warn_pass()]

        @tvm.transform.module_pass(opt_level=0, name="FlexiQTunedPipeline")
        def _pipeline(mod, _ctx):
            with target:
                return tvm.transform.Sequential(passes)(mod)

        return _pipeline


def open_database(tuning_db, target) -> Optional[AppliedDatabase]:
    if tuning_db is None or isinstance(tuning_db, AppliedDatabase):
        return tuning_db
    return AppliedDatabase(tuning_db, target)
