"""Folds an inference BatchNorm into the conv2d (and bias add) that feeds it.

TVM's own FoldBatchnormToConv2D only matches conv2d -> batch_norm; ONNX graphs put a bias add in
between, so this pass matches conv2d [-> add(const)] -> batch_norm -> [0] with constant operands.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, rewrite_call, wildcard


def _np(c):
    return c.value.numpy()


def _fold(func: relax.Function) -> relax.Function:
    x, w, b = wildcard(), is_const(), is_const()
    conv = is_op("relax.nn.conv2d")(x, w)
    conv_b = is_op("relax.add")(conv, b)
    g, be, m, v = is_const(), is_const(), is_const(), is_const()
    bn = is_op("relax.nn.batch_norm")(conv_b | conv, g, be, m, v)
    pat = is_tuple_get_item(bn, 0)

    def rewriter(orig, match):
        conv_call = match[conv]
        bn_call = match[bn]
        at = conv_call.attrs
        if str(at.data_layout) != "NCHW" or str(at.kernel_layout) != "OIHW" or int(bn_call.attrs.axis) != 1:
            return orig
        if bool(bn_call.attrs.training):
            return orig
        weight = _np(match[w]).astype(np.float64)
        O = weight.shape[0]
        bias = _np(match[b]).astype(np.float64).reshape(-1) if b in match else np.zeros(O)
        if bias.size not in (1, O):
            return orig
        gamma, beta, mean, var = (_np(match[t]).astype(np.float64).reshape(-1) for t in (g, be, m, v))
        eps = float(bn_call.attrs.epsilon)
        k = (gamma if bool(bn_call.attrs.scale) else 1.0) / np.sqrt(var + eps)
        new_w = (weight * k.reshape(-1, 1, 1, 1)).astype(np.float32)
        new_b = ((bias - mean) * k + (beta if bool(bn_call.attrs.center) else 0.0)).astype(np.float32)
        y = relax.op.nn.conv2d(match[x], relax.const(new_w), strides=at.strides, padding=at.padding,
                               dilation=at.dilation, groups=at.groups, data_layout="NCHW", kernel_layout="OIHW",
                               out_layout=at.out_layout, out_dtype=at.out_dtype)
        return relax.op.add(y, relax.const(new_b.reshape(1, O, 1, 1)))

    return rewrite_call(pat, rewriter, func)


@tvm.transform.module_pass(opt_level=0, name="FlexiQFoldBatchNorm")
def FoldBatchNorm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    out = mod
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out.update_func(gv, _fold(func))
    return relax.transform.DeadCodeElimination()(out)
