"""The CPU target: the functional reference and accuracy platform (METHOD section 7).

CPUs have no faster 4-bit multiply than the INT8 dot product, so the llvm kernels run one INT8
reduction per layer over strict-subset operands; the ratio changes accuracy, not speed, here.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ..passes.fuse_activation import fuse_activations
from ..passes.fuse_requant import fuse_requantization
from ..passes.fuse_residual import fuse_residual_adds
from ..passes.hoist_weights import hoist_weight_lowering
from ..passes.pack_conv_input import pack_conv_inputs
from ..passes.vnni_narrow_input import vnni_narrow_convs
from ..passes.dense_on_vnni import dense_on_vnni
from ..passes.depthwise_input_view import view_depthwise_inputs
from ..schedules.compute import KERNEL_ATTR
from ..schedules import llvm as llvm_schedules
from ..schedules.x86_amx import amx_usable, target_has_amx, with_amx
from . import register_target
from .base import FlexiQTarget


def host_target(num_cores: int = None) -> tvm.target.Target:
    import os

    cores = num_cores or len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": int(cores)})
    # a CPU with Intel AMX that this process may use: its 1x1 convs run on AMX tiles
    return with_amx(target) if amx_usable() else target


def full_row_depthwise(mod: tvm.IRModule) -> tvm.IRModule:
    """Strided depthwise conv kernels replaced by their `full_rows` form (same parameters, same
    integers; contiguous inner loop, see `compute.conv2d_int8`)."""
    from ..schedules.compute import rebuild_kernel

    out, changed = {}, False
    for gv, f in mod.functions_items():
        a = f.attrs if isinstance(f, tvm.tirx.PrimFunc) else None
        if (a is not None and str(a.get(KERNEL_ATTR, "")) == "conv2d_int8" and str(a.get("flexiq.layout", "")) == "OIHWo"
                and int(a.get("flexiq.ob", 0)) == 1 and "flexiq.strides" in a
                and int(a["flexiq.strides"][1]) > 1 and not int(a.get("flexiq.full_rows", 0))):
            f, changed = rebuild_kernel(f, full_rows=True), True
        out[gv] = f
    if not changed:
        return mod
    return tvm.IRModule(out, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(out)


@register_target("llvm")
class LLVMTarget(FlexiQTarget):
    name = "llvm"

    def __init__(self, tvm_target=None, schedule: bool = True, hoist_weights: bool = True,
                 fuse_activations: bool = True, kernel_variants: bool = True, inline_layers: bool = True):
        super().__init__(tvm_target or host_target())
        self.schedule = schedule
        # deployment builds lower the weights once per ratio change (`flexiq_lower_weights`) and
        # fold ReLU/ReLU6 into the layer epilogues; debugging builds driven by hand
        # (compile_with_taps) keep main's plain signature and the pre-activation layer outputs
        self.hoist_weights = hoist_weights
        self.fuse_activations = fuse_activations
        # packed quantize -> VNNI conv, spatial-lane 1x1 convs, depthwise input views, full-row depthwise,
        # 1x1 convs writing the next depthwise layer's codes
        self.kernel_variants = kernel_variants
        # the per-layer Relax functions inlined into `main`: one VM frame instead of one call per
        # layer with its argument checks, and one memory plan over the whole graph
        self.inline_layers = inline_layers

    def prepare(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Target-specific Relax rewrites before the kernels are scheduled, each keeping the
        integers (the artifact stays bit-exact):

        * dense layers as 1x1 convs over the transposed batch, on the VNNI dot product
          (`passes.dense_on_vnni`), and RGB stems on VNNI (`passes.vnni_narrow_input`);
        * depthwise kernels reading their input through a view that vectorizes: column pairs at
          stride 2, the flattened plane over narrow rows (`passes.depthwise_input_view`); other
          strided depthwise kernels over full rows;
        * the VNNI convs' inputs written packed by the quantize kernels (`passes.pack_conv_input`);
        * activations folded into the epilogues (`passes.fuse_activation`);
        * the weight lowering moved out of the per-call path (`passes.hoist_weights`);
        * the layer functions inlined into `main`, then the residual adds folded into the convs
          whose output they read (`passes.fuse_residual`) and the 1x1 convs that feed a depthwise
          conv writing its INT8 codes (`passes.fuse_requant`)."""
        if self.kernel_variants:
            mod = pack_conv_inputs(full_row_depthwise(view_depthwise_inputs(vnni_narrow_convs(dense_on_vnni(mod)))),
                                   amx=target_has_amx(self.tvm_target) and amx_usable())
        if self.fuse_activations:
            mod = fuse_activations(mod)
        if self.hoist_weights:
            mod = hoist_weight_lowering(mod)
        if not self.inline_layers:
            return mod
        mod = relax.transform.InlinePrivateFunctions()(mod)
        # (across layers: a layer's conv and the next layer's quantize meet only once inlined)
        return fuse_requantization(fuse_residual_adds(mod)) if self.kernel_variants else mod

    def pipeline(self, tuning_db=None) -> tvm.transform.Pass:
        target = self

        @tvm.transform.module_pass(opt_level=0, name="FlexiQPrepareLLVM")
        def _prepare(mod, _ctx):
            return target.prepare(mod)

        return tvm.transform.Sequential([_prepare, super().pipeline(tuning_db)])

    def schedule_kernel(self, func):
        if self.schedule:
            return llvm_schedules.schedule_llvm(func, self.tvm_target)
        return llvm_schedules.schedule_fallback(func, self.tvm_target)
