"""Let the quantize kernel write the layout the VNNI conv reads.

A VNNI conv (`conv2d_int8`, weight layout "OIHWo4i") reduces over 4 input channels per 32-bit
lane, so it first repacks its NCHW int8 input into `[N, C/4, Hp, Wp, 4]` bytes: a scalar
byte-interleaving pass over the whole feature map on every call. This pass rebuilds the layer's
quantize kernel with `pack4` (it writes those bytes directly, as uint32 words) and the conv with
`packed_input=True` (no repack stage), joined by a zero-copy `R.memory.view` from uint32 to bytes;
1x1 convs over a plane of 16k positions also take the spatial-lanes form (accumulators along the
output row, no transposing epilogue). With ``amx=True`` (a target CPU with Intel AMX) the other
pointwise convs (planes that are not a multiple of 16 positions) run on AMX tiles
(`schedules/x86_amx.py`): their weight lowering is rebuilt for the one-output-channel-per-row
layout those tiles read.
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


# AMX takes the pointwise convs whose plane is not a multiple of 16 positions (MobileNetV2's 14x14
# and 7x7 layers), which VNNI runs with the accumulators across output channels and a transposing
# epilogue: there it was 1.5-2x faster in the model at batch 32 (`benchmarks/README.md`). Where
# the spatial-lanes VNNI form applies, it stayed as fast or faster (the epilogue, not the MACs,
# bounds those layers, and it reads AMX's stored tiles more slowly), so it is kept there.
AMX_MIN_CHANNELS = 16


def pack_conv_inputs(mod: tvm.IRModule, amx: bool = False) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    changed = False
    for gv, f in mod.functions_items():
        if not (isinstance(f, relax.Function) and f.attrs is not None and "flexiq.layer" in f.attrs):
            continue
        bindings = [b for blk in f.body.blocks for b in blk.bindings]
        qbind = {b.var: b for b in bindings
                 if kernel_kind(mod, b.value) == "quantize_act"}
        lbind = {b.var: b for b in bindings
                 if kernel_kind(mod, b.value) == "lower_weight"}
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
                spatial = _spatial_ok(kf)
                conv_args = list(b.value.args[1].fields[1:])
                lb = lbind.get(conv_args[0])
                if amx and lb is not None and _amx_ok(kf) and any(x.same_as(lb) for x in out):
                    lk = bb.add_func(rebuild_kernel(flexiq_kernel(mod, lb.value), ob=1), lb.value.args[0].name_hint + "_amx")
                    wtype = relax.TensorType(param_shape(bb.get()[lk], len(bb.get()[lk].params) - 1), "int8")
                    wvar = relax.DataflowVar("w_amx", wtype)
                    out = [relax.VarBinding(wvar, relax.call_tir(lk, list(lb.value.args[1].fields), wtype))
                           if x.same_as(lb) else x for x in out]
                    conv_args[0] = wvar
                    ck = bb.add_func(rebuild_kernel(kf, packed_input=True, spatial_lanes=True, ob=1, amx=True),
                                     b.value.args[0].name_hint + "_amx")
                else:
                    ck = bb.add_func(rebuild_kernel(kf, packed_input=True, spatial_lanes=spatial),
                                     b.value.args[0].name_hint + "_packed")
                pshape = param_shape(bb.get()[ck], 0)
                wshape = param_shape(bb.get()[qk], 4)
                words = relax.DataflowVar("q_packed", relax.TensorType(wshape, "uint32"))
                qcall = relax.call_tir(qk, list(qb.value.args[1].fields), relax.TensorType(wshape, "uint32"))
                view = relax.DataflowVar("q_bytes", relax.TensorType(pshape, "uint8"))
                # the quantize binding (earlier in the block) becomes dead; it is replaced in place below
                out = [relax.VarBinding(words, qcall) if x.same_as(qb) else x for x in out]
                out.append(relax.VarBinding(view, relax.op.memory.view(words, pshape, "uint8")))
                out.append(relax.VarBinding(b.var, relax.call_tir(ck, [view] + conv_args,
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


def _pointwise(kf) -> bool:
    """A 1x1 stride-1 unpadded single-group conv (its positions can be the accumulator lanes)."""
    xs, wl, ys = param_shape(kf, 0), param_shape(kf, 1), param_shape(kf, len(kf.params) - 1)
    a = kf.attrs
    return (int(a["flexiq.groups"]) == 1 and wl[2] == wl[3] == 1 and [int(v) for v in a["flexiq.strides"]] == [1, 1]
            and xs[2:4] == ys[2:4])


def _spatial_ok(kf) -> bool:
    """A pointwise conv whose output plane is a multiple of 16 positions: the accumulator can run
    along the positions on VNNI (compute.conv2d_int8 spatial_lanes)."""
    ys = param_shape(kf, len(kf.params) - 1)
    return _pointwise(kf) and (ys[2] * ys[3]) % 16 == 0


def _amx_ok(kf) -> bool:
    """A pointwise conv that maps onto AMX tiles (`x86_amx.amx_blocking`), over a plane of at
    least 16 positions that the spatial-lanes VNNI form cannot take."""
    from ..schedules.x86_amx import amx_blocking

    C = int(kf.attrs["flexiq.in_channels"])
    ys = param_shape(kf, len(kf.params) - 1)
    return (_pointwise(kf) and not _spatial_ok(kf) and ys[2] * ys[3] >= 16 and C >= AMX_MIN_CHANNELS
            and amx_blocking(ys[1], (C + 3) // 4) is not None)
