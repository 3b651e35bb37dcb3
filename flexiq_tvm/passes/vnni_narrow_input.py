"""Run a 3-channel conv (an RGB stem) on the VNNI dot product.

`compute.choose_conv_layout` gives VNNI (`"OIHWo4i"`, four input channels per 32-bit lane) only
to convs with at least four input channels per group, so an RGB stem takes the blocked layout:
int32 multiply-adds vectorized over 16 output channels, one input channel at a time. With its
three channels zero-padded to four, one `vpdpbusd` does a whole pixel's channels: MobileNetV2's
stem (3 -> 32, 3x3, stride 2, 224x224) went from 0.39 to 0.18 ms, a quarter of its MACs wasted on
the zero channel. This pass rebuilds such a layer's weight lowering and conv in the VNNI layout
(`compute.rebuild_kernel(layout=...)`); `passes.pack_conv_input` then has the quantize kernel
write the packed bytes (the fourth byte repeats the third channel and meets zero weights).
Same integers. The layout choice of the other targets (the rewrite's defaults) is untouched.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.compute import KERNEL_ATTR, param_shape, rebuild_kernel
from .kernel_calls import finish, flexiq_kernel, kernel_kind

__all__ = ["vnni_narrow_convs"]


# input channels per group that take the padded VNNI layout (measured: 3, an RGB image)
NARROW_CHANNELS = (3,)


def _narrow(kf) -> bool:
    a = kf.attrs
    if not (str(a[KERNEL_ATTR]) == "conv2d_int8" and str(a.get("flexiq.layout", "")) == "OIHWo"
            and int(a.get("flexiq.groups", 0)) == 1
            and not any(int(a.get("flexiq." + k, 0)) for k in ("packed_input", "full_rows", "pair_cols", "flat_plane"))):
        return False
    O = param_shape(kf, len(kf.params) - 1)[1]
    return param_shape(kf, 1)[1] in NARROW_CHANNELS and O % 8 == 0


def vnni_narrow_convs(mod: tvm.IRModule) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    changed = False
    for gv, f in mod.functions_items():
        if not (isinstance(f, relax.Function) and f.attrs is not None and "flexiq.layer" in f.attrs):
            continue
        bindings = [b for blk in f.body.blocks for b in blk.bindings]
        lower = {b.var: b for b in bindings
                 if kernel_kind(mod, b.value) == "lower_weight"}
        new_blocks, touched = [], False
        for blk in f.body.blocks:
            out = []
            for b in blk.bindings:
                kf = flexiq_kernel(mod, b.value)
                wsrc = b.value.args[1].fields[1] if kf is not None else None
                lb = lower.get(wsrc) if isinstance(wsrc, relax.Var) else None
                if kf is None or lb is None or not _narrow(kf) or not any(x.same_as(lb) for x in out):
                    out.append(b)
                    continue
                O = param_shape(kf, len(kf.params) - 1)[1]
                ob = 16 if O % 16 == 0 else 8
                lf = rebuild_kernel(flexiq_kernel(mod, lb.value), layout="OIHWo4i", ob=ob)
                lk = bb.add_func(lf, lb.value.args[0].name_hint + "_vnni")
                ck = bb.add_func(rebuild_kernel(kf, layout="OIHWo4i", ob=ob), b.value.args[0].name_hint + "_vnni")
                wty = relax.TensorType(param_shape(lf, len(lf.params) - 1), "int8")
                wl = relax.DataflowVar("w_vnni", wty)
                # the lowering binding (earlier in the block) is replaced in place
                out = [relax.VarBinding(wl, relax.call_tir(lk, list(lb.value.args[1].fields), wty))
                       if x.same_as(lb) else x for x in out]
                args = list(b.value.args[1].fields)
                args[1] = wl
                out.append(relax.VarBinding(b.var, relax.call_tir(ck, args, b.value.ty_args[0] if b.value.ty_args
                                                                  else b.var.ty)))
                touched = True
            new_blocks.append(type(blk)(out))
        if touched:
            bb.update_func(gv, relax.Function(f.params, relax.SeqExpr(new_blocks, f.body.body), f.ret_ty,
                                              f.is_pure, f.attrs))
            changed = True
    if not changed:
        return mod
    return finish(bb.get())
