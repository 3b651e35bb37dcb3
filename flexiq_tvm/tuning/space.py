"""Design spaces: what MetaSchedule searches for each kind of task."""
from __future__ import annotations

from typing import Optional


def kernel_space(flexiq_target):
    """The space of a FlexiQ kernel on this target, or None where its kernels are not tunable.

    llvm: ``schedules.llvm.apply_schedule`` itself (a ``ScheduleFn``). Its choices made through
    ``sch.sample_perfect_tile`` / ``sch.sample_categorical`` (hand-picked default as the decision)
    are what the search varies; a schedule without sampling instructions is a one-point space,
    measured once. No postprocessors: the hand schedule is complete (VNNI tensorized, parallel,
    vectorized), and MetaSchedule's rewrites would only reorder it."""
    from tvm.s_tir import meta_schedule as ms

    if flexiq_target.name != "llvm" or not getattr(flexiq_target, "schedule", True):
        return None
    from ..schedules import llvm as llvm_schedules

    tvm_target = flexiq_target.tvm_target

    def sch_fn(sch):
        if not llvm_schedules.apply_schedule(sch, tvm_target):
            raise ValueError("not a FlexiQ llvm kernel")

    return ms.space_generator.ScheduleFn(sch_fn, sch_rules=[], postprocs=[], mutator_probs="from-target")


# below this many output elements a fused CPU function is searched without `parallel` (the same
# threshold the llvm kernels use, schedules/llvm.py): measured alone, a parallel candidate of a
# microsecond-sized function looks fast (the runner keeps the thread pool hot); inside the model
# every such launch waits for the other core (+7 us per model call on the 2-core test machine)
PARALLEL_MIN_WORK = 1 << 18


def output_elements(mod) -> int:
    func = mod["main"]
    n = 0
    for p in func.params:
        b = func.buffer_map[p] if hasattr(func, "buffer_map") else p  # 0.27: buffer-typed params
        if hasattr(b, "shape"):
            size = 1
            for d in b.shape:
                size *= int(d) if hasattr(d, "value") or isinstance(d, int) else 1 << 20
            n = max(n, size)
    return n


def fused_space(tvm_target, exact: bool = True, small: bool = False):
    """MetaSchedule's default space for the other PrimFuncs. ``exact`` (CPU): without the
    ``AddRFactor`` rule, so that a float reduction keeps its summation order and a tuned build
    returns the same bits as an untuned one, and without ``RandomComputeLocation`` (see below)."""
    from tvm.s_tir import meta_schedule as ms

    kind = tvm_target.kind.name
    rules: Optional[list] = None
    if kind == "llvm" and exact:
        # RandomComputeLocation too: in TVM 0.27 a replay with another compute location can change
        # later GetLoops counts, and that error escapes the search (it ends the whole tuning run)
        rules = [r for r in ms.schedule_rule.ScheduleRule.create("llvm")
                 if type(r).__name__ not in ("AddRFactor", "RandomComputeLocation")]
        if small:
            rules = [ms.schedule_rule.ParallelizeVectorizeUnroll(max_jobs_per_core=-1, max_vectorize_extent=64,
                                                                 unroll_max_steps=[0, 16, 64, 512],
                                                                 unroll_explicit=True)
                     if type(r).__name__ == "ParallelizeVectorizeUnroll" else r for r in rules]
    return ms.space_generator.PostOrderApply(sch_rules=rules if rules is not None else "from-target",
                                             postprocs="from-target", mutator_probs="from-target")


def kernel_design_point(task, flexiq_target):
    """The hand schedule of a FlexiQ kernel task as a Schedule (default decisions), and whether
    MetaSchedule can search its space: it needs sampling instructions, and a trace TVM 0.27 can
    print (its task scheduler logs every design space; ``DecomposePadding`` cannot be printed)."""
    from tvm import s_tir

    from ..schedules import llvm as llvm_schedules

    sch = s_tir.Schedule(task.mod)
    if not llvm_schedules.apply_schedule(sch, flexiq_target.tvm_target):
        raise ValueError(f"{task.name}: not a FlexiQ llvm kernel")
    sampling = any(inst.kind.name.startswith("Sample") for inst in sch.trace.insts)
    note = None
    if sampling:
        try:
            sch.trace.as_python()
        except Exception:  # noqa: BLE001
            sampling, note = False, "default decisions only (TVM 0.27 cannot print this trace)"
    if sampling and not replayable(task.mod, sch.trace):
        sampling, note = False, ("default decisions only: the schedule's instructions change with the sampled "
                                 "decisions, so MetaSchedule cannot replay it")
    return sch, sampling, note


def replayable(mod, trace, samples: int = 32) -> bool:
    """Does the trace replay with other random decisions? MetaSchedule's search replays design
    spaces and mutated traces; a schedule function that branches in Python on a sampled extent
    records a trace that fails there, and TVM 0.27 lets that error end the whole tuning run."""
    from tvm import s_tir

    bare = s_tir.Trace(trace.insts, {})
    for seed in range(1, samples + 1):
        try:
            bare.apply_to_schedule(s_tir.Schedule(mod, seed=seed), remove_postproc=True)
        except Exception:  # noqa: BLE001
            return False
    return True
