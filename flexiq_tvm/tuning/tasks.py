"""Tuning tasks of a rewritten FlexiQ module: its FlexiQ layer kernels and every other PrimFunc
after TVM's legalization and fusion (what the target's pipeline would otherwise leave as it is)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import tvm

from ..schedules.compute import KERNEL_ATTR
from .database import normalize, workload_hash


@dataclass
class Task:
    """One MetaSchedule workload: a normalized PrimFunc (``mod["main"]``)."""

    name: str                       # the PrimFunc's name in the model (first one seen)
    mod: tvm.IRModule               # the normalized workload MetaSchedule keys by structural hash
    kind: str                       # "flexiq" (a FlexiQ layer kernel) or "fused" (a PrimFunc after fusion)
    kernel: Optional[str] = None    # the "flexiq.kernel" attr of a FlexiQ kernel
    weight: int = 1                 # how many times the model calls it
    hash: str = ""
    names: List[str] = field(default_factory=list)


def is_kernel(func) -> bool:
    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs


def _mark_kernels_opaque(mod: tvm.IRModule) -> tvm.IRModule:
    """What the target's schedule pass does to the kernels, less the schedule: fusion must see the
    same graph as in a real build."""
    out = {}
    for gv, func in mod.functions_items():
        out[gv] = func.with_attr("op_pattern", 8) if is_kernel(func) else func
    return tvm.IRModule(out, attrs=mod.attrs)


def backend_pipeline(target: tvm.target.Target):
    """The module of TVM's default Relax pipeline for the target (``relax.pipeline``'s own
    ``dataflow_lower_passes`` fails for llvm in 0.27: cpu_generic does not export it)."""
    import importlib

    kind = target.kind.name
    name = {"llvm": "cpu_generic", "c": "cpu_generic", "cuda": "cuda", "rocm": "rocm"}.get(kind, "gpu_generic")
    return importlib.import_module(f"tvm.relax.backend.{name}.pipeline")


def fusion_passes(target: tvm.target.Target) -> list:
    """The target's default Relax passes up to FuseTIR (the point where MetaSchedule applies)."""
    P = backend_pipeline(target)
    passes = list(P.library_dispatch_passes(target))
    for p in P.legalize_passes(target):
        passes.append(p)
        if p.info.name == "FuseTIR":
            break
    return passes


def fused_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    with target:
        return tvm.transform.Sequential(fusion_passes(target))(_mark_kernels_opaque(mod))


def extract_tasks(mod: tvm.IRModule, flexiq_target) -> List[Task]:
    """The tasks of a rewritten module (``passes.flexiq_rewrite`` output) for a FlexiQTarget.

    The FlexiQ kernels come from the module as the target's schedule pass sees them; the other
    PrimFuncs from the module after legalization and fusion (MetaSchedule's own extraction)."""
    from tvm.s_tir import meta_schedule as ms

    target = flexiq_target.tvm_target
    # what the target's build does before its schedule pass (cuda: `lower` in build; llvm:
    # `prepare` at the head of its pipeline), so the workloads are the kernels the build schedules
    for hook in ("lower", "prepare"):
        fn = getattr(flexiq_target, hook, None)
        if fn is not None:
            mod = fn(mod)
    tasks: dict = {}

    def add(name, nmod, kind, kernel=None, weight=1):
        h = workload_hash(nmod)
        if h in tasks:
            tasks[h].weight += weight
            tasks[h].names.append(name)
        else:
            tasks[h] = Task(name=name, mod=nmod, kind=kind, kernel=kernel, weight=weight, hash=h, names=[name])

    for gv, func in mod.functions_items():
        if is_kernel(func):
            add(gv.name_hint, normalize(func), "flexiq", str(func.attrs[KERNEL_ATTR]))
    fused = fused_module(mod, target)
    for et in ms.relax_integration.extract_tasks(fused, target):
        nmod = et.dispatched[0]
        if is_kernel(nmod["main"]):
            continue
        add(et.task_name, nmod, "fused", weight=int(et.weight))
    return list(tasks.values())
