"""Let the quantize kernel write the layout the VNNI conv reads.

A VNNI conv (`conv2d_int8`, weight layout "OIHWo4i") reduces over 4 input channels per 32-bit
lane, so it first repacks its NCHW int8 input into `[N, C/4, Hp, Wp, 4]` bytes: a scalar
byte-interleaving pass over the whole feature map on every call. This pass rebuilds the layer's
quantize kernel with `pack4` (it writes those bytes directly, as uint32 words) and the conv with
`packed_input=True` (no repack stage), joined by a zero-copy `R.memory.view` from uint32 to bytes;
1x1 convs over a plane of 16k positions also take the spatial-lanes form (accumulators along the
output row, no transposing epilogue).
Same integers; only static NCHW quantization is rewritten (dynamic extraction keeps its stages).
"""
from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.compute import KERNEL_ATTR, param_shape, rebuild_kernel
from .kernel_calls import finish, flexiq_kernel, kernel_kind

__all__ = ["pack_conv_inputs"]


def _packable(qf, kf) -> bool:
    return (qf is not None and kf is not None and str(qf.attrs[KERNEL_ATTR]) == "quantize_act"
            and str(qf.attrs.get("flexiq.layout", "")) == "NCHW" and not int(qf.attrs.get("flexiq.dynamic", 0))
            and "flexiq.pad" in qf.attrs and str(kf.attrs[KERNEL_ATTR]) == "conv2d_int8"
            and str(kf.attrs.get("flexiq.layout", "")) == "OIHWo4i" and not int(kf.attrs.get("flexiq.packed_input", 0)))


def pack_conv_inputs(mod: tvm.IRModule) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    changed = False
    for gv, f in mod.functions_items():
        if not (isinstance(f, relax.Function) and f.attrs is not None and "flexiq.layer" in f.attrs):
            continue
        bindings = [b for blk in f.body.blocks for b in blk.bindings]
        qbind = {b.var: b for b in bindings
                 if kernel_kind(mod, b.value) == "quantize_act"}
        new_blocks, touched = [], False
        for blk in f.body.blocks:
            out = []
            for b in blk.bindings:
                kf = flexiq_kernel(mod, b.value)
                src = b.value.args[1].fields[0] if kf is not None else None
                qb = qbind.get(src) if src is not None and isinstance(src, relax.Var) else None
                if kf is None or qb is None or not _packable(flexiq_kernel(mod, qb.value), kf):
                    out.append(b)
                    continue
                qf = flexiq_kernel(mod, qb.value)
                groups = int(kf.attrs["flexiq.groups"])
                C = int(kf.attrs["flexiq.in_channels"])
                qk = bb.add_func(rebuild_kernel(qf, pack4=(groups, C // groups)), qb.value.args[0].name_hint + "_packed")
                ck = bb.add_func(rebuild_kernel(kf, packed_input=True, spatial_lanes=_spatial_ok(kf)),
                                 b.value.args[0].name_hint + "_packed")
                pshape = param_shape(bb.get()[ck], 0)
                wshape = param_shape(bb.get()[qk], 4)
                words = relax.DataflowVar("q_packed", relax.TensorType(wshape, "uint32"))
                qcall = relax.call_tir(qk, list(qb.value.args[1].fields), relax.TensorType(wshape, "uint32"))
                view = relax.DataflowVar("q_bytes", relax.TensorType(pshape, "uint8"))
                # the quantize binding (earlier in the block) becomes dead; it is replaced in place below
                out = [relax.VarBinding(words, qcall) if x.same_as(qb) else x for x in out]
                out.append(relax.VarBinding(view, relax.op.memory.view(words, pshape, "uint8")))
                out.append(relax.VarBinding(b.var, relax.call_tir(ck, [view] + list(b.value.args[1].fields[1:]),
                                                                  b.value.ty_args[0] if b.value.ty_args else b.var.ty)))
                touched = True
            new_blocks.append(type(blk)(out))
        if touched:
            bb.update_func(gv, relax.Function(f.params, relax.SeqExpr(new_blocks, f.body.body), f.ret_ty,
                                              f.is_pure, f.attrs))
            changed = True
    if not changed:
        return mod
    return finish(bb.get())


def _spatial_ok(kf) -> bool:
    """A 1x1 stride-1 unpadded single-group conv whose output plane is a multiple of 16
    positions: the accumulator can run along the positions (compute.conv2d_int8 spatial_lanes)."""
    xs, wl, ys = param_shape(kf, 0), param_shape(kf, 1), param_shape(kf, len(kf.params) - 1)
    a = kf.attrs
    return (int(a["flexiq.groups"]) == 1 and wl[2] == wl[3] == 1 and [int(v) for v in a["flexiq.strides"]] == [1, 1]
            and xs[2:4] == ys[2:4] and (ys[2] * ys[3]) % 16 == 0)
