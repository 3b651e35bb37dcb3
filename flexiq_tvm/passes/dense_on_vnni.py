"""Run a dense layer as a 1x1 conv on the VNNI dot product.

`compute.dense_int8` multiplies one int8 input channel at a time (int32 multiply-adds vectorized
over output channels): MobileNetV2's classifier (1280 -> 1000) at batch 32 took 5.5 ms, about 7
GMAC/s. A dense ``[M, C] x [O, C]`` is a 1x1 conv, and the conv kernels have the VNNI forms
(`vpdpbusd`, four input channels per 32-bit lane): this pass transposes the layer's float input to
``[1, C, M, 1]`` (the M rows of the batch become the conv's output positions), quantizes it with
the NCHW kernel, lowers the weight into the VNNI layout and runs `conv2d_int8` over it, then
transposes ``[1, O, M, 1]`` back to ``[M, O]``. `passes.pack_conv_input` then has the quantize
kernel write the packed words, and a batch of 16 or more rows takes the spatial-lanes form (16
rows per accumulator vector). Same integers and the same float epilogue, so the artifact stays
bit-exact. Only static quantization of a 2-D input is rewritten, with ``O`` a multiple of 8 and at
least 4 input channels (what the VNNI layout takes); other dense layers keep `dense_int8`.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.compute import (KERNEL_ATTR, choose_conv_layout, conv2d_int8, lower_weight, param_shape,
                                 quantize_act)
from .kernel_calls import finish, flexiq_kernel, kernel_kind

__all__ = ["dense_on_vnni"]


def _eligible(df, qf, lf, wconst) -> bool:
    a = df.attrs
    if str(a.get("flexiq.out", "float")) != "float" or int(a.get("flexiq.residual", 0)):
        return False
    if qf is None or lf is None or not isinstance(wconst, tvm.ir.Constant):
        return False
    if int(qf.attrs.get("flexiq.dynamic", 0)) or len(param_shape(qf, 0)) != 2 or int(lf.attrs.get("flexiq.w_prepacked", 0)):
        return False
    C = param_shape(df, 0)[1]
    O = param_shape(df, len(df.params) - 1)[1]
    return choose_conv_layout(O, 1, C)[0] == "OIHWo4i"


def _act(a):
    if "flexiq.act_lo" not in a:
        return None
    return tuple(None if str(a[k]) == "none" else float(a[k]) for k in ("flexiq.act_lo", "flexiq.act_hi"))


def _with_attrs(new, old):
    """``new`` carrying ``old``'s attributes beyond its own (layer names, tuning keys)."""
    for k, v in old.attrs.items():
        if k not in new.attrs and k != "global_symbol":
            new = new.with_attr(k, v)
    return new


def dense_on_vnni(mod: tvm.IRModule) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    changed = False
    for gv, f in mod.functions_items():
        if not (isinstance(f, relax.Function) and f.attrs is not None and "flexiq.layer" in f.attrs):
            continue
        bindings = [b for blk in f.body.blocks for b in blk.bindings]
        by_var = {b.var: b for b in bindings}
        new_blocks, touched = [], False
        for blk in f.body.blocks:
            out = []
            for b in blk.bindings:
                df = flexiq_kernel(mod, b.value)
                if df is None or str(df.attrs[KERNEL_ATTR]) != "dense_int8":
                    out.append(b)
                    continue
                args = list(b.value.args[1].fields)
                qb, lb = by_var.get(args[0]), by_var.get(args[1])
                qf = flexiq_kernel(mod, qb.value) if qb is not None and kernel_kind(mod, qb.value) == "quantize_act" else None
                lf = flexiq_kernel(mod, lb.value) if lb is not None and kernel_kind(mod, lb.value) == "lower_weight" else None
                wconst = lb.value.args[1].fields[0] if lf is not None else None
                if not (_eligible(df, qf, lf, wconst) and any(x.same_as(qb) for x in out)
                        and any(x.same_as(lb) for x in out)):
                    out.append(b)
                    continue
                M, C = param_shape(df, 0)
                O = param_shape(df, len(df.params) - 1)[1]
                layout, ob = choose_conv_layout(O, 1, C)
                qa, la, da = qf.attrs, lf.attrs, df.attrs
                L, li = int(qa["flexiq.num_layers"]), int(qa["flexiq.layer_index"])
                qkern = quantize_act((1, C, M, 1), 1, 0, float(qa["flexiq.scale"]), bool(qa["flexiq.unsigned"]), li, L)
                lkern = lower_weight((O, C, 1, 1), 1, param_shape(lf, 3)[1], int(la["flexiq.layer_index"]),
                                     param_shape(lf, 1)[0], in_channels=C, ob=ob, layout=layout)
                ckern = conv2d_int8((1, C, M, 1), (O, C, 1, 1), unsigned=bool(da["flexiq.unsigned"]), ob=ob, layout=layout,
                                    exact_epilogue=bool(int(da.get("flexiq.exact_epilogue", 1))), act=_act(da))
                qk = bb.add_func(_with_attrs(qkern, qf), qb.value.args[0].name_hint + "_nchw")
                lk = bb.add_func(_with_attrs(lkern, lf), lb.value.args[0].name_hint + "_vnni")
                ck = bb.add_func(_with_attrs(ckern, df), b.value.args[0].name_hint + "_conv")
                x = qb.value.args[1].fields[0]
                qdt = "uint8" if bool(qa["flexiq.unsigned"]) else "int8"
                xt = relax.DataflowVar("x_cols", relax.TensorType((C, M), "float32"))
                x4 = relax.DataflowVar("x_nchw", relax.TensorType((1, C, M, 1), "float32"))
                q4 = relax.DataflowVar("q_nchw", relax.TensorType((1, C, M, 1), qdt))
                wl_shape = param_shape(bb.get()[lk], 4)
                wl = relax.DataflowVar("w_vnni", relax.TensorType(wl_shape, "int8"))
                w4 = relax.const(wconst.value.numpy().reshape(O, C, 1, 1))
                seq = [relax.VarBinding(xt, relax.op.permute_dims(x, [1, 0])),
                       relax.VarBinding(x4, relax.op.reshape(xt, (1, C, M, 1))),
                       relax.VarBinding(q4, relax.call_tir(qk, [x4] + list(qb.value.args[1].fields[1:]),
                                                           relax.TensorType((1, C, M, 1), qdt))),
                       relax.VarBinding(wl, relax.call_tir(lk, [w4] + list(lb.value.args[1].fields[1:]),
                                                           relax.TensorType(wl_shape, "int8")))]
                # the quantize and lowering bindings (earlier in the block) are replaced in place
                out = [seq[0] if x_.same_as(qb) else x_ for x_ in out]
                i = next(k for k, x_ in enumerate(out) if x_.same_as(seq[0]))
                out[i + 1:i + 1] = seq[1:3]
                out = [seq[3] if x_.same_as(lb) else x_ for x_ in out]
                y4 = relax.DataflowVar("y_nchw", relax.TensorType((1, O, M, 1), "float32"))
                y2 = relax.DataflowVar("y_cols", relax.TensorType((O, M), "float32"))
                out.append(relax.VarBinding(y4, relax.call_tir(ck, [q4, wl] + args[2:],
                                                               relax.TensorType((1, O, M, 1), "float32"))))
                out.append(relax.VarBinding(y2, relax.op.reshape(y4, (O, M))))
                out.append(relax.VarBinding(b.var, relax.op.permute_dims(y2, [1, 0])))
                touched = True
            new_blocks.append(type(blk)(out))
        if touched:
            bb.update_func(gv, relax.Function(f.params, relax.SeqExpr(new_blocks, f.body.body), f.ret_ty,
                                              f.is_pure, f.attrs))
            changed = True
    if not changed:
        return mod
    return finish(bb.get())
