"""Finds the layers FlexiQ quantizes: conv2d (any groups) and dense/matmul with constant weights.

Everything else stays float. A layer of a quantizable kind that cannot be handled (a conv weight that
is not a constant, another layout, a dynamic shape) also stays float, with a warning that names it:
never a silent wrong answer.

Transformers: every Linear / Gemm / MatMul whose second operand is a constant 2-D weight is a FlexiQ
dense layer (input channels = the reduction axis, the last one; leading axes such as (batch, tokens)
fold into GEMM rows). A matmul of two activations (attention's q @ k^T and attn @ v) has no weight to
store in INT8 or to bit-extract; by policy (`ACT_MATMUL_POLICY = "float"`, our choice) it stays float32
without a warning, as do LayerNorm, Softmax and GELU (METHOD section 1). They are listed in
`find_layers(..., act_matmuls=[])` for reports.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from tvm import relax

from ..quant.layer import LayerSpec
from .graph import (bindings, const_value, dtype_of, is_const, nonnegative_vars, op_name, static_shape, tensor_dims,
                    use_counts)

# matmuls of two activations: "float" (the only policy implemented) keeps them float32, quietly
ACT_MATMUL_POLICY = "float"

# ops of a kind FlexiQ could quantize but does not support: reported, left in float
_UNSUPPORTED_MAC_OPS = ("relax.nn.conv1d", "relax.nn.conv3d", "relax.nn.conv1d_transpose",
                        "relax.nn.conv2d_transpose", "relax.nn.conv3d_transpose", "relax.linear")


class FloatFallbackWarning(UserWarning):
    """A layer that FlexiQ leaves in float (named in the message)."""


@dataclass
class FoundLayer:
    spec: LayerSpec
    var: relax.Var                      # binding var of the conv2d / matmul call
    bias_var: Optional[relax.Var]       # binding var of the absorbed bias add, if any


def _bias_of(func, var, out_channels: int, op: str, uses, by_arg):
    """A constant per-output-channel bias added right after the layer (absorbed into its epilogue)."""
    if uses.get(var, 0) != 1:
        return None, None
    for b in by_arg.get(var, []):
        v = b.value
        if op_name(v) != "relax.add" or len(v.args) != 2:
            continue
        other = v.args[1] if v.args[0].same_as(var) else v.args[0]
        if not is_const(other) or dtype_of(other) != "float32":
            continue
        c = const_value(other)
        if c.size != out_channels:
            continue
        shape = c.shape
        if op == "conv2d" and (len(shape) == 1 or shape[-2:] != (1, 1) or (len(shape) >= 3 and shape[-3] != out_channels)):
            continue
        if op == "dense" and shape[-1] != out_channels:
            continue
        if b.var.ty.shape is None or len(b.var.ty.shape.values) != len(var.ty.shape.values):
            continue
        return c.reshape(-1).astype(np.float32), b.var
    return None, None


def _leading_dim(expr) -> Optional[str]:
    dims = tensor_dims(expr)
    return str(dims[0]) if dims else None


def find_layers(func: relax.Function, warn: bool = True, act_matmuls: Optional[list] = None) -> List[FoundLayer]:
    """Quantizable layers of `main`, in program order, with stable names (`conv2d_0`, `dense_7`, ...).

    `act_matmuls`, if a list, receives the binding vars of activation-by-activation matmuls (kept
    float by `ACT_MATMUL_POLICY`)."""
    uses = use_counts(func)
    nonneg = nonnegative_vars(func)
    by_arg = {}
    for b in bindings(func):
        for a in relax.analysis.free_vars(b.value):
            by_arg.setdefault(a, []).append(b)
    found: List[FoundLayer] = []
    index = 0
    batch_dim = _leading_dim(func.params[0]) if len(func.params) else None

    def fallback(what, reason):
        if warn:
            warnings.warn(f"{what}: {reason}; it stays in float32", FloatFallbackWarning, stacklevel=3)

    for b in bindings(func):
        v = b.value
        name = op_name(v)
        if name in _UNSUPPORTED_MAC_OPS:
            fallback(f"layer {b.var} ({name})", "this op is not supported by FlexiQ")
            continue
        if name not in ("relax.nn.conv2d", "relax.matmul"):
            continue
        x, w = v.args[0], v.args[1]
        label = f"layer {b.var} ({name})"
        if dtype_of(x) != "float32" or dtype_of(b.var) != "float32":
            fallback(label, f"input dtype {dtype_of(x)} is not float32")
            continue
        if not is_const(w):
            if name == "relax.nn.conv2d":
                fallback(label, "the weight is not a constant")
            elif not is_const(x) and act_matmuls is not None:
                act_matmuls.append(b.var)      # activation x activation: float by policy, no warning
            continue
        in_shape, out_shape = static_shape(x), static_shape(b.var)
        if in_shape is None or out_shape is None:
            fallback(label, "only the batch axis may be dynamic")
            continue
        if batch_dim is not None and _leading_dim(x) != batch_dim:
            # e.g. (batch * tokens, features) after a reshape: the per-sample shape is unknown here
            fallback(label, f"its input's leading axis ({_leading_dim(x)}) is not the model's batch axis "
                            f"({batch_dim})")
            continue
        weight = const_value(w).astype(np.float32)
        if name == "relax.nn.conv2d":
            at = v.attrs
            if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout)) != ("NCHW", "OIHW", "NCHW"):
                fallback(label, f"layout {at.data_layout}/{at.kernel_layout} is not NCHW/OIHW")
                continue
            op, kw = "conv2d", dict(groups=int(at.groups), strides=tuple(int(s) for s in at.strides),
                                    padding=tuple(int(p) for p in at.padding),
                                    dilation=tuple(int(d) for d in at.dilation))
            if len(kw["padding"]) == 2:
                kw["padding"] = kw["padding"] * 2
        else:
            if weight.ndim != 2 or len(in_shape) < 1:
                fallback(label, f"weight of rank {weight.ndim} (only 2-D constant weights are dense layers)")
                continue
            op, kw, weight = "dense", {}, np.ascontiguousarray(weight.T)
        lname = f"{op}_{index}"
        bias, bias_var = _bias_of(func, b.var, weight.shape[0], op, uses, by_arg)
        spec = LayerSpec(name=lname, op=op, weight=weight, bias=bias, in_shape=in_shape, out_shape=out_shape,
                         act_unsigned=isinstance(x, relax.Var) and x in nonneg, **kw)
        found.append(FoundLayer(spec=spec, var=b.var, bias_var=bias_var))
        index += 1
    return found
