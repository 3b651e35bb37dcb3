"""Let a depthwise conv read its input through a view whose rows vectorize.

A depthwise conv vectorized along its output row loses lanes two ways, and each has a view of
the same padded bytes that the quantize kernel writes, joined to the conv by a zero-copy
`R.memory.view`:

* **Stride 2: column pairs.** The row reads every other byte: LLVM emits one scalar load per lane
  (MobileNetV2's stride-2 depthwise convs ran at a quarter of the stride-1 ones' speed per output,
  even in the `full_rows` form that computes every column and drops half). Viewed as uint16
  words, word `j` holds column `2j` in byte 0 and `2j + 1` in byte 1, so each tap is a contiguous
  load of words and a shift (`compute.conv2d_int8(pair_cols=True)`); an odd padded width gets
  one more zero column so that the row is whole words.
* **Stride 1 over narrow rows: the flattened plane.** A 7- or 14-wide output row fills 7 or 14 of
  16 lanes. Viewed as one row of `(Hp + 1) * Wp` bytes (one more zero row, so that the last
  taps stay inside), the accumulators run over whole padded rows and every tap is a contiguous
  load (`compute.conv2d_int8(flat_plane=True)`): MobileNetV2's 7x7 and 14x14 depthwise convs
  1.7-1.8x faster. Wider rows already fill their lanes and keep their form (the flattened form
  measured slower from 28-wide rows up).

Same integers; only static NCHW quantization feeding an `"OIHWo"` kernel with `ob == 1` is
rewritten.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.compute import KERNEL_ATTR, param_shape, rebuild_kernel
from .kernel_calls import finish, flexiq_kernel, kernel_kind

__all__ = ["view_depthwise_inputs"]

# the flattened plane pays off below this output row width (measured: 7 and 14 gain, 28 loses)
FLAT_MAX_WIDTH = 16


def _view_form(kf):
    """"pairs", "flat" or None: the view this conv kernel can take."""
    a = kf.attrs
    if not (str(a[KERNEL_ATTR]) == "conv2d_int8" and str(a.get("flexiq.layout", "")) == "OIHWo"
            and int(a.get("flexiq.ob", 0)) == 1 and "flexiq.strides" in a
            and not any(int(a.get("flexiq." + k, 0)) for k in ("packed_input", "full_rows", "pair_cols", "flat_plane"))):
        return None
    strides = [int(v) for v in a["flexiq.strides"]]
    if strides[1] == 2 and int(param_shape(kf, 1)[3]) > 1:
        return "pairs"
    if strides == [1, 1] and param_shape(kf, len(kf.params) - 1)[3] <= FLAT_MAX_WIDTH:
        return "flat"
    return None


def _viewable_quantize(qf) -> bool:
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


def view_depthwise_inputs(mod: tvm.IRModule) -> tvm.IRModule:
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
                qb = qbind.get(src) if isinstance(src, relax.Var) else None
                form = _view_form(kf) if kf is not None else None
                if (form is None or qb is None or not _viewable_quantize(flexiq_kernel(mod, qb.value))
                        or _uses(f, qb.var) != 1 or not any(x.same_as(qb) for x in out)):
                    out.append(b)
                    continue
                qf = flexiq_kernel(mod, qb.value)
                N, C, Hp, Wp = param_shape(qf, 4)
                t, l, bt, r = (int(v) for v in qf.attrs["flexiq.pad"])
                qcall, qdt = qb.value, str(qf.params[4].dtype)
                # a wider quantize output: whole uint16 words / a zero row below the plane
                widen = ([t, l, bt, r + 1] if Wp % 2 else None) if form == "pairs" else [t, l, bt + 1, r]
                if widen is not None:
                    qk = bb.add_func(rebuild_kernel(qf, pad=widen), qb.value.args[0].name_hint + "_" + form)
                    Hp, Wp = Hp + widen[2] - bt, Wp + widen[3] - r
                    qcall = relax.call_tir(qk, list(qb.value.args[1].fields), relax.TensorType([N, C, Hp, Wp], qdt))
                if form == "pairs":
                    ck = bb.add_func(rebuild_kernel(kf, pair_cols=True), b.value.args[0].name_hint + "_pairs")
                    vshape, vdt = [N, C, Hp, Wp // 2], "uint16"
                else:
                    ck = bb.add_func(rebuild_kernel(kf, flat_plane=True), b.value.args[0].name_hint + "_flat")
                    vshape, vdt = [N, C, Hp * Wp], qdt
                qvar = relax.DataflowVar("q_bytes", relax.TensorType([N, C, Hp, Wp], qdt))
                view = relax.DataflowVar("q_view", relax.TensorType(vshape, vdt))
                # the quantize binding (earlier in the block) is replaced in place
                out = [relax.VarBinding(qvar, qcall) if x.same_as(qb) else x for x in out]
                out.append(relax.VarBinding(view, relax.op.memory.view(qvar, vshape, vdt)))
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
