"""Let a conv write its reader's INT8 codes instead of a float feature map.

After the layer functions are inlined, `main` reads `y = conv(...); q = quantize_act(y, counts,
rank, shift)` wherever one layer feeds the next: the conv writes a float32 map that the quantize
kernel reads back once, four bytes each way per element where one byte would do. At batch 32
that round trip goes through DRAM: MobileNetV2's first expansion conv and its reader took 5.3 ms
for 8 images, fused 3.4 ms. When `y` has no other reader, this pass rebuilds the conv with the
reader's quantize rule in its epilogue (`compute.conv2d_int8(requant=...)`: the same float32
operations on the same values, the same lowering of the run-time low channels, so the codes are
identical) and drops the float map.

Two pairs are fused:
* a VNNI conv (`"OIHWo4i"`: its epilogue runs along one output channel's row, so the run-time
  lowering test is one branch per row segment) feeding a static NCHW quantize kernel (a depthwise
  conv's input: one byte per channel);
* a depthwise conv (`"OIHWo"`, `ob == 1`) feeding a packed quantize kernel (a VNNI conv's input,
  four channels per uint32 word, `quantize_act(pack4=...)`): the epilogue writes the words (the
  packed kernel's own expressions; `schedules.llvm._sched_conv_packed_requant` tiles by channel
  quads), when the float map is at least `PACKED_MIN_MAP_BYTES` (4 MiB; below it the map stays
  in cache and the two kernels apart were faster). MobileNetV2 at batch 32: its 17 depthwise
  float maps (about 10 MB per image) were written and read back once each; fused, the model
  took 0.95-0.99 of the time (three A/B runs on a noisy VM).
A VNNI conv feeding a packed reader (ResNet-style 1x1 -> 3x3) is not fused: its spatial-lanes
tiles hold 16 channels at 16 positions, a word needs the four channels of one position.
"""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax

from ..frontend.graph import use_counts
from ..schedules.compute import KERNEL_ATTR, param_shape, rebuild_kernel
from .kernel_calls import finish, flexiq_kernel

__all__ = ["fuse_requantization"]


# A depthwise conv's float map smaller than this stays in cache between the conv and its packed
# reader, and the two kernels apart were faster than fused (MobileNetV2 batch 1, 2-4%: the fused
# epilogue runs the float epilogue and the quantize rule at 16 lanes, the quantize kernel at 64);
# at batch 32 (6-51 MB maps) fusing saved 1-5% of the model.
PACKED_MIN_MAP_BYTES = 4 << 20


def _float_conv(kf) -> bool:
    a = kf.attrs
    return (str(a[KERNEL_ATTR]) == "conv2d_int8" and str(a.get("flexiq.out", "float")) == "float"
            and "flexiq.requant_scale" not in a and not int(a.get("flexiq.residual", 0)))


def _static_quantize(qf, layout: str) -> bool:
    a = qf.attrs
    return (str(a[KERNEL_ATTR]) == "quantize_act" and str(a.get("flexiq.layout", "")) == layout
            and not int(a.get("flexiq.dynamic", 0)) and "flexiq.pad" in a)


def _fusable(cf, qf) -> bool:
    """A VNNI conv feeding a byte-per-channel reader, or a depthwise conv (one channel per output
    row: ``"OIHWo"``, ``ob == 1``, not computed over full rows) feeding a packed reader of whole
    channel quads (a VNNI conv's input: the tile then covers the four channels of a word)."""
    if not _float_conv(cf):
        return False
    a = cf.attrs
    layout = str(a.get("flexiq.layout", ""))
    if layout == "OIHWo4i":
        return _static_quantize(qf, "NCHW")
    if not (layout == "OIHWo" and int(a["flexiq.ob"]) == 1 and not int(a.get("flexiq.full_rows", 0))
            and _static_quantize(qf, "NCHW4c") and int(qf.attrs["flexiq.pack_cg"]) % 4 == 0):
        return False
    n_out = 1
    for v in param_shape(cf, len(cf.params) - 1):
        n_out *= v
    return 4 * n_out >= PACKED_MIN_MAP_BYTES


def fuse_requantization(mod: tvm.IRModule) -> tvm.IRModule:
    main = mod["main"]
    uses = Counter(use_counts(main))
    bindings = [b for block in main.body.blocks for b in block.bindings]
    bound = {b.var: b for b in bindings}
    fuse = {}            # quantize binding var -> the conv binding it absorbs
    for b in bindings:
        qf = flexiq_kernel(mod, b.value)
        if qf is None or str(qf.attrs[KERNEL_ATTR]) != "quantize_act":
            continue
        src = b.value.args[1].fields[0]
        cb = bound.get(src) if isinstance(src, relax.Var) else None
        cf = flexiq_kernel(mod, cb.value) if cb is not None else None
        if cf is None or not _fusable(cf, qf) or uses[src] != 1:
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
                if str(a["flexiq.layout"]) == "NCHW4c":
                    requant["pack4"] = (int(a["flexiq.pack_groups"]), int(a["flexiq.pack_cg"]))
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
