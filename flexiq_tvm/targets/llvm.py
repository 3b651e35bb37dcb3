"""The CPU target: the functional reference and accuracy platform (METHOD section 7).

CPUs have no faster 4-bit multiply than the INT8 dot product, so the llvm kernels run one INT8
reduction per layer over strict-subset operands; the ratio changes accuracy, not speed, here.
"""
from __future__ import annotations

import tvm

from ..schedules import llvm as llvm_schedules
from . import register_target
from .base import FlexiQTarget


def host_target(num_cores: int = None) -> tvm.target.Target:
    import os

    cores = num_cores or len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                              "num-cores": int(cores)})


@register_target("llvm")
class LLVMTarget(FlexiQTarget):
    name = "llvm"

    def __init__(self, tvm_target=None, schedule: bool = True):
        super().__init__(tvm_target or host_target())
        self.schedule = schedule

    def schedule_kernel(self, func):
        if self.schedule:
            return llvm_schedules.schedule_llvm(func, self.tvm_target)
        return llvm_schedules.schedule_fallback(func, self.tvm_target)
