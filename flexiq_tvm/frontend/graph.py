"""Small helpers for reading a Relax `main`: bindings, constants, use counts, value signs."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax


def bindings(func: relax.Function) -> List[relax.VarBinding]:
    out = []
    for block in func.body.blocks:
        out.extend(block.bindings)
    return out


def is_const(expr) -> bool:
    """A tensor constant (scalars such as clip bounds are prim values, not tensors)."""
    return isinstance(expr, tvm.ir.GenericConst)


def prim_number(expr):
    """The Python number of a scalar prim value (IntImm / FloatImm), else None."""
    v = getattr(expr, "value", None)
    return v if isinstance(v, (int, float)) and not is_const(expr) else None


def const_value(expr) -> np.ndarray:
    return expr.value.numpy()


def op_name(expr) -> Optional[str]:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def tensor_dims(expr) -> Optional[list]:
    """The shape entries (IntImm or symbolic) of a tensor expression, or None when unknown."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return list(ty.shape.values)
    except AttributeError:
        return None


def static_shape(expr, skip_batch: bool = True) -> Optional[Tuple[int, ...]]:
    """Per-sample static shape of a tensor expression (batch axis dropped), or None."""
    dims = tensor_dims(expr)
    if dims is None:
        return None
    dims = dims[1:] if skip_batch else dims
    out = []
    for d in dims:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        out.append(int(d))
    return tuple(out)


def dtype_of(expr) -> Optional[str]:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def use_counts(func: relax.Function) -> Dict[relax.Var, int]:
    counts: Dict[relax.Var, int] = {}
    for b in bindings(func):
        for v in relax.analysis.free_vars(b.value):
            counts[v] = counts.get(v, 0) + 1
    for v in relax.analysis.free_vars(func.body.body):
        counts[v] = counts.get(v, 0) + 1
    return counts


_NONNEG_PRESERVING = {
    "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.mean", "relax.sum",
    "relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims", "relax.flatten",
    "relax.add", "relax.multiply", "relax.maximum", "relax.minimum", "relax.strided_slice", "relax.take", "relax.image.resize2d",
}


def nonnegative_vars(func: relax.Function) -> set:
    """Vars whose values are >= 0 by construction (ReLU-like producers and ops that keep signs).

    Drives the unsigned [0, 255] activation range (METHOD section 1) from the graph itself, not from
    calibration data that might just happen to be positive.
    """
    nonneg = set()

    def arg_ok(a):
        if isinstance(a, relax.Var):
            return a in nonneg
        if is_const(a):
            return bool(np.all(const_value(a) >= 0))
        if isinstance(a, relax.Tuple):
            return all(arg_ok(f) for f in a.fields)
        return isinstance(a, relax.ShapeExpr) or prim_number(a) is not None

    for b in bindings(func):
        v = b.value
        name = op_name(v)
        ok = False
        if name in ("relax.nn.relu", "relax.sigmoid", "relax.nn.softmax", "relax.exp"):
            ok = True
        elif name == "relax.clip":
            lo = prim_number(v.args[1])
            ok = lo is not None and lo >= 0
        elif name == "relax.concat":
            ok = arg_ok(v.args[0])
        elif name == "relax.maximum":                 # max(x, 0) is >= 0 whatever x is
            ok = any(arg_ok(a) for a in v.args)
        elif name in _NONNEG_PRESERVING:
            ok = all(arg_ok(a) for a in v.args)
        elif isinstance(v, relax.Var):
            ok = v in nonneg
        if ok:
            nonneg.add(b.var)
    return nonneg
