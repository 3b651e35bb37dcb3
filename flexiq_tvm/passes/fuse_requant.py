"""Let a conv write its reader's INT8 codes instead of a float feature map.

After the layer functions are inlined, `main` reads `y = conv(...); q = quantize_act(y, counts,
rank, shift)` wherever one layer feeds the next: the conv writes a float32 map that the quantize
kernel reads back once, four bytes each way per element where one byte would do. At batch 32
that round trip goes through DRAM: MobileNetV2's first expansion conv and its reader took 5.3 ms
for 8 images, fused 3.4 ms. When `y` has no other reader, this pass rebuilds the conv with the
reader's quantize rule in its epilogue (`compute.conv2d_int8(requant=...)`: the same float32
operations on the same values, the same lowering of the run-time low channels, so the codes are
identical) and drops the float map.

Only VNNI convs (`"OIHWo4i"`: their epilogue runs along one output channel's row, so the
run-time lowering test is one branch per row segment) feeding a static NCHW quantize kernel (a
depthwise conv's input: one byte per channel) are fused. A packed reader (four channels per word)
would need per-byte selects in the epilogue: not done.
"""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax

from ..frontend.graph import use_counts
from ..schedules.compute import KERNEL_ATTR, param_shape, rebuild_kernel
from .kernel_calls import finish, flexiq_kernel

__all__ = ["fuse_requantization"]


def _fusable_conv(kf) -> bool:
    a = kf.attrs
    return (str(a[KERNEL_ATTR]) == "conv2d_int8" and str(a.get("flexiq.layout", "")) == "OIHWo4i"
            and str(a.get("flexiq.out", "float")) == "float" and "flexiq.requant_scale" not in a
            and not int(a.get("flexiq.residual", 0)))


def _fusable_quantize(qf) -> bool:
    a = qf.attrs
    return (str(a[KERNEL_ATTR]) == "quantize_act" and str(a.get("flexiq.layout", "")) == "NCHW"
            and not int(a.get("flexiq.dynamic", 0)) and "flexiq.pad" in a)


def fuse_requantization(mod: tvm.IRModule) -> tvm.IRModule:
    main = mod["main"]
    uses = Counter(use_counts(main))
    bindings = [b for block in main.body.blocks for b in block.bindings]
    bound = {b.var: b for b in bindings}
    fuse = {}            # quantize binding var -> the conv binding it absorbs
    for b in bindings:
        qf = flexiq_kernel(mod, b.value)
        if qf is None or not _fusable_quantize(qf):
            continue
        src = b.value.args[1].fields[0]
        cb = bound.get(src) if isinstance(src, relax.Var) else None
        cf = flexiq_kernel(mod, cb.value) if cb is not None else None
        if cf is None or not _fusable_conv(cf) or uses[src] != 1:
            continue
        if param_shape(qf, 0) != param_shape(cf, len(cf.params) - 1):
            continue
        fuse[b.var] = cb
    if not fuse:
        return mod

    bb = relax.BlockBuilder(mod)
    absorbed = {cb.var for cb in fuse.values()}
    blocks = []
    for block in main.body.blocks:
        out = []
        for b in block.bindings:
            if b.var in absorbed:
                continue
            if b.var in fuse:
                cb, qcall = fuse[b.var], b.value
                qf, cf = flexiq_kernel(mod, qcall), flexiq_kernel(mod, fuse[b.var].value)
                a = qf.attrs
                requant = dict(scale=float(a["flexiq.scale"]), unsigned=bool(a["flexiq.unsigned"]),
                               pad=[int(v) for v in a["flexiq.pad"]], layer_index=int(a["flexiq.layer_index"]),
                               num_layers=int(a["flexiq.num_layers"]))
                kgv = bb.add_func(rebuild_kernel(cf, requant=requant), cb.value.args[0].name_hint + "_rq")
                args = list(cb.value.args[1].fields) + list(qcall.args[1].fields[1:])
                b = relax.VarBinding(b.var, relax.call_tir(kgv, args, qcall.ty_args[0] if qcall.ty_args else b.var.ty))
            out.append(b)
        blocks.append(type(block)(out))
    mod = bb.get()
    out = dict(mod.functions_items())
    out[mod.get_global_var("main")] = relax.Function(main.params, relax.SeqExpr(blocks, main.body.body),
                                                      main.ret_ty, main.is_pure, main.attrs)
    new = tvm.IRModule(out, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(out)
    return finish(new)
