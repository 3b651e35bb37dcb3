"""Token-tensor operators on the NPU's vector unit and mover (docs/npu.md section 4.3).

A transformer keeps layer norm, softmax, GELU, residual adds, the attention's activation x
activation matmuls (Q K^T, A V: FlexiQ leaves them float32 by policy) and the reshapes / transposes
between its dense layers. Run on the host, each of them sends a dense layer's result out as float32
and reads the next layer's input back (section 8). Here each such Relax op becomes an operator of
the NPU program, so the transformer stack is one NPU function and activations stay on chip.

`vec_spec` is the one place that decides which calls the NPU takes (partition.py calls it as the
pattern check) and how the simulator runs them (codegen.py fills `NPUAdd` from it). Every operator
reproduces the host kernel's float32 arithmetic (runtime.c, `npu_vec_compute`), so it is bit-exact.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax

# Relax op -> number of call arguments the pattern matches
VEC_OPS = {"relax.reshape": 2, "relax.permute_dims": 1, "relax.take": 2, "relax.broadcast_to": 2,
           "relax.concat": 1, "relax.add": 2, "relax.multiply": 2, "relax.divide": 2, "relax.erf": 1,
           "relax.nn.layer_norm": 3, "relax.nn.softmax": 1, "relax.matmul": 2}


class NotOnNPU(ValueError):
    """The call is not an operator the NPU runs bit-exactly (it stays on the host)."""


def is_const(e) -> bool:
    return isinstance(e, (tvm.ir.GenericConst, tvm.ir.Constant))


def _f32_shape(e) -> Tuple[int, ...]:
    """Static shape of a float32 tensor expression (NotOnNPU otherwise)."""
    try:
        ty = e.ty
        if str(ty.dtype) != "float32":
            raise NotOnNPU("not float32")
        return tuple(int(v) for v in ty.shape.values)
    except (AttributeError, TypeError) as err:
        raise NotOnNPU(f"no static float32 shape ({err})") from None


def _const_f32(e) -> np.ndarray:
    a = e.value.numpy()
    if a.dtype != np.float32:
        raise NotOnNPU("constant is not float32")
    return a


def _strides(shape) -> List[int]:
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= int(d)
    return st[::-1]


def _tensor(e) -> Tuple[int, ...]:
    if is_const(e):
        raise NotOnNPU("constant operand where a tensor is expected")
    return _f32_shape(e)


def _scalar_const(e) -> Optional[float]:
    """The value of a one-element float32 constant, else None."""
    if not is_const(e):
        return None
    a = _const_f32(e)
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _elementwise(name: str, a, b, out_shape) -> Dict:
    """add / multiply of two same-shape tensors, or of a tensor and a constant (scalar or full)."""
    n = int(np.prod(out_shape))
    kinds = {"relax.add": ("add", "adds"), "relax.multiply": ("mul", "muls")}[name]
    if not is_const(a) and not is_const(b):
        if _f32_shape(a) != tuple(out_shape) or _f32_shape(b) != tuple(out_shape):
            raise NotOnNPU("broadcasting between two tensors")
        return dict(kind=kinds[0], n=n, n_op=[n, n], inputs=[(0, a), (1, b)])
    if is_const(a) and is_const(b):
        raise NotOnNPU("two constants")
    t, c = (a, b) if is_const(b) else (b, a)       # IEEE add and multiply are commutative, bit for bit
    if _f32_shape(t) != tuple(out_shape):
        raise NotOnNPU("the tensor operand is broadcast")
    sc = _scalar_const(c)
    if sc is not None:
        return dict(kind=kinds[1], n=n, n_op=[n, 0], s=sc, inputs=[(0, t)])
    full = np.ascontiguousarray(np.broadcast_to(_const_f32(c), out_shape), np.float32)
    return dict(kind=kinds[0], n=n, n_op=[n, n], consts=[None, full], inputs=[(0, t)])


def vec_spec(call, args=None, out_shape=None) -> Dict:
    """What the NPU does for one Relax call: a dict of NPUAdd fields (kind name, n, n_op, consts,
    params, s, d, g, g0) and `inputs`, the (operand slot, expr) of its tensor operands. Raises
    NotOnNPU for calls it does not take (they stay on the host). `args` / `out_shape` replace the
    call's own (the codegen passes the external function's values bound to a composite's params)."""
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op) or call.op.name not in VEC_OPS:
        raise NotOnNPU("not a vector operator")
    name = call.op.name
    args = list(call.args) if args is None else list(args)
    out = tuple(out_shape) if out_shape is not None else _f32_shape(call)
    n = int(np.prod(out))
    at = call.attrs
    if name == "relax.reshape":
        x = args[0]
        if isinstance(x, relax.Call) and isinstance(x.op, tvm.ir.Op) and x.op.name == "relax.take" \
                and not is_const(x.args[1]):
            raise NotOnNPU("reshape of a run-time row take (a bias-table row)")
        if int(np.prod(_tensor(x))) != n:
            raise NotOnNPU("reshape changes the element count")
        return dict(kind="copy", n=n, n_op=[n, 0], inputs=[(0, x)])
    if name == "relax.permute_dims":
        S = _tensor(args[0])
        axes = [int(a) % len(S) for a in at.axes] if at.axes is not None else list(range(len(S)))[::-1]
        st = _strides(S)
        if len(S) > 8:
            raise NotOnNPU("rank > 8")
        return dict(kind="gather", n=n, n_op=[int(np.prod(S)), 0], d=[S[a] for a in axes],
                    g=[st[a] for a in axes], g0=0, inputs=[(0, args[0])])
    if name == "relax.take":
        S = _tensor(args[0])
        if not is_const(args[1]):
            raise NotOnNPU("run-time index")
        idx = args[1].value.numpy()
        if idx.dtype.kind not in "iu" or idx.size != 1:
            raise NotOnNPU("take of more than one index")
        ax = int(at.axis) % len(S)
        i = int(idx.reshape(-1)[0])
        mode = str(getattr(at, "mode", "fast"))
        if mode == "wrap":
            i %= S[ax]
        elif mode == "clip":
            i = min(max(i, 0), S[ax] - 1)
        elif not 0 <= i < S[ax]:
            raise NotOnNPU("index out of range")
        st = _strides(S)
        keep = [k for k in range(len(S)) if k != ax] if idx.ndim == 0 else list(range(len(S)))
        dims = [S[k] if k != ax else 1 for k in keep]
        if int(np.prod(dims)) != n or len(dims) > 8:
            raise NotOnNPU("unexpected take shape")
        return dict(kind="gather", n=n, n_op=[int(np.prod(S)), 0], d=dims, g=[st[k] for k in keep],
                    g0=i * st[ax], inputs=[(0, args[0])])
    if name == "relax.broadcast_to":
        S = _tensor(args[0])
        if len(out) > 8 or len(S) > len(out):
            raise NotOnNPU("rank")
        Sx = (1,) * (len(out) - len(S)) + tuple(S)
        st = _strides(Sx)
        g = []
        for k, (si, so) in enumerate(zip(Sx, out)):
            if si not in (1, so):
                raise NotOnNPU("not broadcastable")
            g.append(0 if si == 1 else st[k])
        return dict(kind="gather", n=n, n_op=[int(np.prod(S)), 0], d=list(out), g=g, g0=0, inputs=[(0, args[0])])
    if name == "relax.concat":
        tup = args[0]
        fields = list(tup.fields) if isinstance(tup, relax.Tuple) else None
        if fields is None or len(fields) != 2:
            raise NotOnNPU("concat of other than two tensors")
        ax = int(at.axis) % len(out)
        shapes = [tuple(_const_f32(f).shape) if is_const(f) else _f32_shape(f) for f in fields]
        outer, inner = int(np.prod(out[:ax])), int(np.prod(out[ax + 1:]))
        consts, inputs = [None, None], []
        for k, f in enumerate(fields):
            if is_const(f):
                consts[k] = np.ascontiguousarray(_const_f32(f), np.float32)
            else:
                inputs.append((k, f))
        if not inputs:
            raise NotOnNPU("concat of constants")
        na, nb = shapes[0][ax], shapes[1][ax]
        return dict(kind="concat", n=n, n_op=[outer * na * inner, outer * nb * inner], consts=consts,
                    d=[outer, na, nb, inner], inputs=inputs)
    if name in ("relax.add", "relax.multiply"):
        return _elementwise(name, args[0], args[1], out)
    if name == "relax.divide":
        sc = _scalar_const(args[1])
        if sc is None or _tensor(args[0]) != out:
            raise NotOnNPU("divide by other than a scalar constant")
        return dict(kind="divs", n=n, n_op=[n, 0], s=sc, inputs=[(0, args[0])])
    if name == "relax.erf":
        if _tensor(args[0]) != out:
            raise NotOnNPU("shape")
        return dict(kind="erf", n=n, n_op=[n, 0], inputs=[(0, args[0])])
    if name == "relax.nn.layer_norm":
        S = _tensor(args[0])
        axes = [int(a) % len(S) for a in at.axes]
        if axes != [len(S) - 1] or not (bool(at.center) and bool(at.scale)):
            raise NotOnNPU("layer norm over other than the last axis, or without scale / center")
        if not (is_const(args[1]) and is_const(args[2])):
            raise NotOnNPU("run-time gamma / beta")
        D = S[-1]
        gamma, beta = _const_f32(args[1]).reshape(-1), _const_f32(args[2]).reshape(-1)
        if gamma.size != D or beta.size != D:
            raise NotOnNPU("gamma / beta shape")
        return dict(kind="layer_norm", n=n, n_op=[n, 0], d=[n // D, D], s=float(np.float32(float(at.epsilon))),
                    params=np.concatenate([gamma, beta]).astype(np.float32), inputs=[(0, args[0])])
    if name == "relax.nn.softmax":
        S = _tensor(args[0])
        if int(at.axis) % len(S) != len(S) - 1:
            raise NotOnNPU("softmax over other than the last axis")
        return dict(kind="softmax", n=n, n_op=[n, 0], d=[n // S[-1], S[-1]], inputs=[(0, args[0])])
    if name == "relax.matmul":
        A, B = _tensor(args[0]), _tensor(args[1])
        od = getattr(at, "out_dtype", None)
        if od is not None and str(od) not in ("", "void", "float32"):
            raise NotOnNPU("out_dtype")
        if len(A) < 2 or len(B) < 2 or A[:-2] != B[:-2] or A[-1] != B[-2]:
            raise NotOnNPU("matmul with broadcasting or 1-D operands")
        bt = int(np.prod(A[:-2]))
        return dict(kind="matmul", n=n, n_op=[int(np.prod(A)), int(np.prod(B))],
                    d=[bt, A[-2], A[-1], B[-1]], inputs=[(0, args[0]), (1, args[1])])
    raise NotOnNPU(name)
