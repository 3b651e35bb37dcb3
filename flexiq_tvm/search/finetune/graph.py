"""A small interpreter that runs a prepared Relax `main` in PyTorch (float32, differentiable).

Why Relax and not ONNX: `main` after `load_model` (BatchNorm folded, constants folded) is exactly
the graph the FlexiQ rewrite compiles, and `find_layers` names its layers by binding var. Running
that same graph in torch makes every layer line up with its `LayerSpec` by identity (no name or
order matching against another file), works for every model source `load_model` accepts (ONNX,
torch, IRModule), and needs no second importer. The price is one torch function per Relax op that
the supported models use; an op outside that set fails loudly (`UnsupportedOp`), never silently.

`RelaxTorchGraph.run(x, layer_fn)` evaluates `main`, calling `layer_fn(i, x_in)` for FlexiQ layer i
(whose result replaces both the conv/matmul binding and its absorbed bias add, as the rewrite does).
`segments()` lists cut points where a single tensor carries everything forward (block boundaries,
for block-wise reconstruction); `run_range` evaluates the bindings between two cuts.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np


class UnsupportedOp(NotImplementedError):
    """A Relax op that the torch interpreter has no implementation for."""


def _torch():
    import torch
    import torch.nn.functional as F

    return torch, F


def _ints(v) -> List[int]:
    return [int(a) for a in v]


class RelaxTorchGraph:
    def __init__(self, model):
        import tvm
        from tvm import relax

        from ...frontend.graph import bindings, const_value, is_const, op_name

        self._tvm, self._relax = tvm, relax
        self._is_const, self._const_value, self._op_name = is_const, const_value, op_name
        self.model = model
        main = model.mod["main"]
        self.func = main
        self.param = main.params[0]
        self.bindings = bindings(main)
        self.layer_of = {}
        self.bias_alias = {}
        for i, fl in enumerate(model.layers):
            self.layer_of[fl.var] = i
            if fl.bias_var is not None:
                self.bias_alias[fl.bias_var] = fl.var
        self.output = main.body.body
        self._consts: Dict[int, object] = {}
        # symbolic dims (the batch axis) of the input, resolved per call
        self._input_dims = list(self.param.ty.shape.values)
        self._binding_index = {b.var: k for k, b in enumerate(self.bindings)}

    # ---- values ----------------------------------------------------------------------------
    def _const(self, expr):
        torch, _ = _torch()
        # keyed by the node, not the Python wrapper: every traversal wraps the same constant in a new
        # object, so id() would grow this cache by one copy per constant per forward pass
        key = expr.__chandle__()
        hit = self._consts.get(key)
        if hit is None:
            arr = np.asarray(self._const_value(expr))
            hit = torch.from_numpy(arr.copy()) if arr.ndim else torch.tensor(arr.item(), dtype=_torch_dtype(arr.dtype))
            self._consts[key] = (expr, hit)     # keep the node alive: its handle stays unique
            return hit
        return hit[1]

    def _prim(self, e, sym):
        """Python value of a PrimExpr / PrimValue, with symbolic vars from `sym`."""
        tir = self._tvm.tirx
        if isinstance(e, (int, float)):
            return e
        if isinstance(e, (tir.IntImm, tir.FloatImm)):
            return e.value
        if isinstance(e, tir.Var):
            if e.name not in sym:
                raise UnsupportedOp(f"symbolic dim {e.name} is unknown")
            return sym[e.name]
        ops = {tir.Add: lambda a, b: a + b, tir.Sub: lambda a, b: a - b, tir.Mul: lambda a, b: a * b,
               tir.FloorDiv: lambda a, b: a // b, tir.FloorMod: lambda a, b: a % b}
        for cls, fn in ops.items():
            if isinstance(e, cls):
                return fn(self._prim(e.a, sym), self._prim(e.b, sym))
        raise UnsupportedOp(f"shape expression {e!r}")

    def _shape(self, e, sym) -> List[int]:
        return [int(self._prim(v, sym)) for v in e.values]

    def _val(self, e, env, sym):
        relax = self._relax
        if isinstance(e, relax.Var):
            return env[e]
        if self._is_const(e):
            return self._const(e)
        if isinstance(e, relax.Tuple):
            return [self._val(f, env, sym) for f in e.fields]
        if isinstance(e, relax.ShapeExpr):
            return self._shape(e, sym)
        try:
            return self._prim(e, sym)
        except UnsupportedOp:
            raise UnsupportedOp(f"argument of kind {type(e).__name__}") from None

    # ---- evaluation ------------------------------------------------------------------------
    def symbols(self, x) -> dict:
        sym = {}
        for d, n in zip(self._input_dims, x.shape):
            if isinstance(d, self._tvm.tirx.Var):
                sym[d.name] = int(n)
        return sym

    def symbols_batch(self, n: int) -> dict:
        d = self._input_dims[0] if self._input_dims else None
        return {d.name: int(n)} if isinstance(d, self._tvm.tirx.Var) else {}

    def run(self, x, layer_fn: Callable, taps: Optional[Sequence[int]] = None):
        """The model output for input `x` (a torch tensor); FlexiQ layer i computed by layer_fn(i, x_in)."""
        env = {self.param: x}
        sym = self.symbols(x)
        self.run_range(env, sym, 0, len(self.bindings), layer_fn)
        return self._val(self.output, env, sym)

    def run_range(self, env: dict, sym: dict, start: int, stop: int, layer_fn: Callable):
        relax = self._relax
        for b in self.bindings[start:stop]:
            var, v = b.var, b.value
            if var in self.bias_alias:
                env[var] = env[self.bias_alias[var]]
                continue
            if var in self.layer_of:
                env[var] = layer_fn(self.layer_of[var], self._val(v.args[0], env, sym))
                continue
            if isinstance(v, relax.Var):
                env[var] = env[v]
            elif isinstance(v, relax.TupleGetItem):
                env[var] = self._val(v.tuple_value, env, sym)[int(v.index)]
            elif isinstance(v, relax.Tuple):
                env[var] = self._val(v, env, sym)
            elif self._is_const(v):
                env[var] = self._const(v)
            elif isinstance(v, relax.Call):
                env[var] = self._call(v, env, sym)
            else:
                raise UnsupportedOp(f"binding {var} of kind {type(v).__name__}")
        return env

    def _call(self, call, env, sym):
        torch, F = _torch()
        name = self._op_name(call)
        if name is None:
            raise UnsupportedOp(f"call of {call.op} (only Relax ops are interpreted)")
        a = [self._val(x, env, sym) for x in call.args]
        at = call.attrs
        fn = _OPS.get(name)
        if fn is None:
            raise UnsupportedOp(f"Relax op {name} has no torch implementation in flexiq_tvm.search.finetune.graph")
        return fn(a, at, self, call, sym)

    # ---- block structure -------------------------------------------------------------------
    def cuts(self) -> List[int]:
        """Binding indices k such that after bindings[:k] exactly one tensor (bindings[k-1].var)
        is still needed by the rest of the graph: the places a block-wise pass can cut."""
        relax = self._relax
        last_use: Dict = {}
        for k, b in enumerate(self.bindings):
            for v in relax.analysis.free_vars(b.value):
                last_use[v] = k
        n = len(self.bindings)
        for v in relax.analysis.free_vars(self.output):
            last_use[v] = n
        out = []
        live = {self.param}
        for k, b in enumerate(self.bindings):
            live.add(b.var)
            live = {v for v in live if last_use.get(v, -1) > k}
            if len(live) == 1 and b.var in live and k + 1 < n:
                out.append(k + 1)
        return out

    def layers_between(self, start: int, stop: int) -> List[int]:
        return [self.layer_of[b.var] for b in self.bindings[start:stop] if b.var in self.layer_of]


def _torch_dtype(dt):
    torch, _ = _torch()
    return {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64, np.dtype("int64"): torch.int64,
            np.dtype("int32"): torch.int32, np.dtype("bool"): torch.bool}.get(np.dtype(dt), torch.float32)


def _axis_list(v, ndim):
    if v is None:
        return list(range(ndim))
    return [int(a) % ndim for a in v]


def _conv2d(a, at, g, call, sym):
    torch, F = _torch()
    x, w = a
    pad = _ints(at.padding)
    if len(pad) == 2:
        pad = pad * 2
    pt, pl, pb, pr = pad
    if (pt, pl) != (pb, pr):
        x = F.pad(x, (pl, pr, pt, pb))
        pt = pl = 0
    return F.conv2d(x, w, None, _ints(at.strides), (pt, pl), _ints(at.dilation), int(at.groups))


def _reduce(kind):
    def fn(a, at, g, call, sym):
        x = a[0]
        axes = _axis_list(at.axis, x.ndim)
        keep = bool(at.keepdims)
        return getattr(x, kind)(dim=axes, keepdim=keep) if axes else x
    return fn


def _permute(a, at, g, call, sym):
    x = a[0]
    axes = list(range(x.ndim))[::-1] if at.axes is None else _ints(at.axes)
    return x.permute(*axes)


def _layer_norm(a, at, g, call, sym):
    torch, F = _torch()
    x, gamma, beta = a
    axes = _axis_list(at.axes, x.ndim)
    if axes != list(range(x.ndim - len(axes), x.ndim)):
        raise UnsupportedOp("layer_norm over non-trailing axes")
    shape = x.shape[-len(axes):]
    return F.layer_norm(x, shape, gamma if at.scale else None, beta if at.center else None, float(at.epsilon))


def _take(a, at, g, call, sym):
    torch, _ = _torch()
    x, idx = a
    axis = int(at.axis) % x.ndim if at.axis is not None else None
    if axis is None:
        x, axis = x.reshape(-1), 0
    idx = torch.as_tensor(idx).long()
    mode = str(at.mode)
    if mode == "wrap":
        idx = idx % x.shape[axis]
    elif mode == "clip":
        idx = idx.clamp(0, x.shape[axis] - 1)
    if idx.ndim == 0:
        return x.select(axis, int(idx))
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _strided_slice(a, at, g, call, sym):
    x = a[0]
    axes = _ints(at.axes)
    begin, end = _ints(at.begin), _ints(at.end)
    strides = _ints(at.strides) if at.strides is not None else [1] * len(axes)
    idx = [slice(None)] * x.ndim
    for ax, b, e, s in zip(axes, begin, end, strides):
        if s < 0:
            raise UnsupportedOp("strided_slice with a negative stride")
        idx[ax % x.ndim] = slice(b, min(e, x.shape[ax % x.ndim]), s)
    return x[tuple(idx)]


def _clip(a, at, g, call, sym):
    torch, _ = _torch()
    return torch.clamp(a[0], float(a[1]), float(a[2]))


def _pool(kind):
    def fn(a, at, g, call, sym):
        torch, F = _torch()
        x = a[0]
        if str(at.layout) != "NCHW":
            raise UnsupportedOp(f"{kind} in layout {at.layout}")
        pad = _ints(at.padding)
        if len(pad) == 2:
            pad = pad * 2
        if any(pad):
            if kind == "max":
                x = F.pad(x, (pad[1], pad[3], pad[0], pad[2]), value=float("-inf"))
            else:
                if not bool(getattr(at, "count_include_pad", False)):
                    raise UnsupportedOp("avg_pool2d with padding not counted")
                x = F.pad(x, (pad[1], pad[3], pad[0], pad[2]))
        if bool(at.ceil_mode):
            raise UnsupportedOp(f"{kind}_pool2d with ceil_mode")
        f = F.max_pool2d if kind == "max" else F.avg_pool2d
        return f(x, _ints(at.pool_size), _ints(at.strides), 0, *([_ints(at.dilation)] if kind == "max" else []))
    return fn


def _adaptive_avg(a, at, g, call, sym):
    torch, F = _torch()
    size = _ints(at.output_size) if at.output_size is not None else list(a[0].shape[2:])
    return F.adaptive_avg_pool2d(a[0], size)


def _astype(a, at, g, call, sym):
    torch, _ = _torch()
    return a[0].to(_torch_dtype(np.dtype(str(at.dtype))))


def _shape_of(a, at, g, call, sym):
    torch, _ = _torch()
    return list(a[0].shape)


def _shape_to_tensor(a, at, g, call, sym):
    torch, _ = _torch()
    return torch.tensor([int(v) for v in a[0]], dtype=torch.int64)


def _broadcast_to(a, at, g, call, sym):
    return a[0].expand(*a[1])


def _flatten(a, at, g, call, sym):
    return a[0].reshape(a[0].shape[0], -1)


def _binary(fn):
    def op(a, at, g, call, sym):
        torch, _ = _torch()
        x, y = a
        return fn(torch, torch.as_tensor(x) if not hasattr(x, "shape") else x,
                  torch.as_tensor(y) if not hasattr(y, "shape") else y)
    return op


def _gelu(approx):
    def fn(a, at, g, call, sym):
        torch, F = _torch()
        return F.gelu(a[0], approximate=approx)
    return fn


def _softmax(a, at, g, call, sym):
    return a[0].softmax(int(at.axis))


def _concat(a, at, g, call, sym):
    torch, _ = _torch()
    return torch.cat(list(a[0]), dim=int(at.axis))


_OPS = {
    "relax.nn.conv2d": _conv2d,
    "relax.matmul": lambda a, at, g, c, s: a[0] @ a[1],
    "relax.add": _binary(lambda t, x, y: x + y),
    "relax.subtract": _binary(lambda t, x, y: x - y),
    "relax.multiply": _binary(lambda t, x, y: x * y),
    "relax.divide": _binary(lambda t, x, y: x / y),
    "relax.power": _binary(lambda t, x, y: t.pow(x, y)),
    "relax.maximum": _binary(lambda t, x, y: t.maximum(x, y.to(x.dtype))),
    "relax.minimum": _binary(lambda t, x, y: t.minimum(x, y.to(x.dtype))),
    "relax.where": lambda a, at, g, c, s: _torch()[0].where(_torch()[0].as_tensor(a[0]), a[1], a[2]),
    "relax.clip": _clip,
    "relax.nn.relu": lambda a, at, g, c, s: _torch()[1].relu(a[0]),
    "relax.nn.silu": lambda a, at, g, c, s: _torch()[1].silu(a[0]),
    "relax.nn.gelu": _gelu("none"),
    "relax.nn.gelu_tanh": _gelu("tanh"),
    "relax.sigmoid": lambda a, at, g, c, s: a[0].sigmoid(),
    "relax.tanh": lambda a, at, g, c, s: a[0].tanh(),
    "relax.exp": lambda a, at, g, c, s: a[0].exp(),
    "relax.erf": lambda a, at, g, c, s: _torch()[0].erf(a[0]),
    "relax.sqrt": lambda a, at, g, c, s: a[0].sqrt(),
    "relax.rsqrt": lambda a, at, g, c, s: a[0].rsqrt(),
    "relax.negative": lambda a, at, g, c, s: -a[0],
    "relax.nn.softmax": _softmax,
    "relax.nn.layer_norm": _layer_norm,
    "relax.mean": _reduce("mean"),
    "relax.sum": _reduce("sum"),
    "relax.max": _reduce("amax"),
    "relax.reshape": lambda a, at, g, c, s: a[0].reshape(*a[1]),
    "relax.permute_dims": _permute,
    "relax.flatten": _flatten,
    "relax.squeeze": lambda a, at, g, c, s: a[0].squeeze(tuple(_ints(at.axis))) if at.axis is not None else a[0].squeeze(),
    "relax.expand_dims": lambda a, at, g, c, s: _expand_dims(a[0], _ints(at.axis)),
    "relax.concat": _concat,
    "relax.take": _take,
    "relax.strided_slice": _strided_slice,
    "relax.broadcast_to": _broadcast_to,
    "relax.shape_of": _shape_of,
    "relax.shape_to_tensor": _shape_to_tensor,
    "relax.astype": _astype,
    "relax.nn.max_pool2d": _pool("max"),
    "relax.nn.avg_pool2d": _pool("avg"),
    "relax.nn.adaptive_avg_pool2d": _adaptive_avg,
}


def _expand_dims(x, axes):
    out_nd = x.ndim + len(axes)
    for ax in sorted(a % out_nd for a in axes):
        x = x.unsqueeze(ax)
    return x
