"""Let a stride-2 depthwise conv read its input as pairs of columns.

A depthwise conv of horizontal stride 2 vectorized along its output row reads every other byte
of the input row: LLVM emits one scalar load per lane (MobileNetV2's stride-2 depthwise convs ran
at a quarter of the stride-1 ones' speed per output, even in the `full_rows` form that computes
every column and drops half). Viewed as uint16 words, the padded input row holds column `2j` in
byte 0 and column `2j + 1` in byte 1 of word `j`, so each tap is a contiguous load of words and a
shift (`compute.conv2d_int8(pair_cols=True)`). This pass joins the layer's quantize kernel and the
conv with a zero-copy `R.memory.view` from bytes to words; when the padded width is odd the
quantize kernel writes one more zero column so that the row is whole words (the conv never reads
it). Same integers; only static NCHW quantization feeding an `"OIHWo"` depthwise kernel
(`ob == 1`) is rewritten.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.compute import KERNEL_ATTR, param_shape, rebuild_kernel

__all__ = ["pair_strided_inputs"]

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _kernel(mod, call):
    if isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR):
        f = mod[call.args[0]]
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs:
            return f
    return None


def _pairable_conv(kf) -> bool:
    a = kf.attrs
    return (str(a[KERNEL_ATTR]) == "conv2d_int8" and str(a.get("flexiq.layout", "")) == "OIHWo"
            and int(a.get("flexiq.ob", 0)) == 1 and "flexiq.strides" in a and int(a["flexiq.strides"][1]) == 2
            and int(param_shape(kf, 1)[3]) > 1
            and not any(int(a.get("flexiq." + k, 0)) for k in ("packed_input", "full_rows", "pair_cols")))


def _pairable_quantize(qf) -> bool:
    a = qf.attrs
    return (str(a[KERNEL_ATTR]) == "quantize_act" and str(a.get("flexiq.layout", "")) == "NCHW"
            and not int(a.get("flexiq.dynamic", 0)) and "flexiq.pad" in a)


def _uses(f: relax.Function, var) -> int:
    n = [0]

    def visit(e):
        if isinstance(e, relax.Var) and e.same_as(var):
            n[0] += 1

    relax.analysis.post_order_visit(f.body, visit)
    return n[0]


def pair_strided_inputs(mod: tvm.IRModule) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    changed = False
    for gv, f in mod.functions_items():
        if not (isinstance(f, relax.Function) and f.attrs is not None and "flexiq.layer" in f.attrs):
            continue
        bindings = [b for blk in f.body.blocks for b in blk.bindings]
        qbind = {b.var: b for b in bindings
                 if str(getattr(_kernel(mod, b.value), "attrs", {}).get(KERNEL_ATTR, "")) == "quantize_act"}
        new_blocks, touched = [], False
        for blk in f.body.blocks:
            out = []
            for b in blk.bindings:
                kf = _kernel(mod, b.value)
                src = b.value.args[1].fields[0] if kf is not None else None
                qb = qbind.get(src) if isinstance(src, relax.Var) else None
                if (kf is None or qb is None or not _pairable_conv(kf) or not _pairable_quantize(_kernel(mod, qb.value))
                        or _uses(f, qb.var) != 1 or not any(x.same_as(qb) for x in out)):
                    out.append(b)
                    continue
                qf = _kernel(mod, qb.value)
                N, C, Hp, Wp = param_shape(qf, 4)
                qcall = qb.value
                if Wp % 2:      # one more zero column: the row becomes whole uint16 words
                    t, l, bt, r = (int(v) for v in qf.attrs["flexiq.pad"])
                    qk = bb.add_func(rebuild_kernel(qf, pad=[t, l, bt, r + 1]), qb.value.args[0].name_hint + "_even")
                    Wp += 1
                    qcall = relax.call_tir(qk, list(qb.value.args[1].fields), relax.TensorType([N, C, Hp, Wp], "uint8"))
                ck = bb.add_func(rebuild_kernel(kf, pair_cols=True), b.value.args[0].name_hint + "_pairs")
                wshape = [N, C, Hp, Wp // 2]
                qvar = relax.DataflowVar("q_bytes", relax.TensorType([N, C, Hp, Wp], "uint8"))
                view = relax.DataflowVar("q_pairs", relax.TensorType(wshape, "uint16"))
                # the quantize binding (earlier in the block) is replaced in place
                out = [relax.VarBinding(qvar, qcall) if x.same_as(qb) else x for x in out]
                out.append(relax.VarBinding(view, relax.op.memory.view(qvar, wshape, "uint16")))
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
    return relax.transform.DeadCodeElimination(
        [g.name_hint for g, fn in bb.get().functions_items()
         if isinstance(fn, relax.Function) and fn.attrs is not None and "global_symbol" in fn.attrs])(
        relax.transform.Normalize()(bb.get()))
