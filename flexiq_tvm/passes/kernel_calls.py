"""What the llvm deployment passes share: finding the FlexiQ kernel a binding calls, and tidying
the module after a rewrite replaced some bindings.

Each pass (`pack_conv_input`, `vnni_narrow_input`, `depthwise_input_view`, `dense_on_vnni`,
`fuse_requant`, `fuse_residual`) swaps kernels for equivalent variants; the bindings they replace
leave dead kernels and unnormalized expressions behind, which `finish` removes in one place.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.compute import KERNEL_ATTR

__all__ = ["CALL_TIR", "flexiq_kernel", "kernel_kind", "finish"]

CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def flexiq_kernel(mod: tvm.IRModule, call):
    """The FlexiQ PrimFunc (`"flexiq.kernel"` attribute) that ``call`` runs through `call_tir`,
    or None."""
    if isinstance(call, relax.Call) and call.op.same_as(CALL_TIR):
        f = mod[call.args[0]]
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs:
            return f
    return None


def kernel_kind(mod: tvm.IRModule, call) -> str:
    """``"conv2d_int8"``, ``"quantize_act"``, ...: the kind of FlexiQ kernel ``call`` runs ("" when none)."""
    f = flexiq_kernel(mod, call)
    return "" if f is None else str(f.attrs[KERNEL_ATTR])


def finish(mod: tvm.IRModule) -> tvm.IRModule:
    """Normalize, then drop what no public function reaches (the replaced kernels and bindings)."""
    mod = relax.transform.Normalize()(mod)
    public = [g.name_hint for g, fn in mod.functions_items()
              if isinstance(fn, relax.Function) and fn.attrs is not None and "global_symbol" in fn.attrs]
    return relax.transform.DeadCodeElimination(public)(mod)
