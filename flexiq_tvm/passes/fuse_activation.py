"""Fold the activation after a FlexiQ layer (ReLU, ReLU6, clip) into the layer's epilogue.

After the rewrite, `main` reads `y = flexiq_layer_i(...); a = relu(y)` (or `clip`, or ONNX
Clip's `maximum` then `minimum`). A layer function is opaque to TVM's FuseOps, so the activation
stays a separate kernel: one more pass over every feature map (MobileNetV2: ~10% of a batch-1
call). When the layer's output has no other user, this pass rebuilds the layer's conv/dense
kernel with `act=(lo, hi)` (`compute.rebuild_kernel`) and turns the activation bindings into
aliases. `min(max(v, lo), hi)` on float32 is what the Relax ops compute, so outputs are unchanged
bit for bit.

Layers whose output is also read elsewhere (a tap, a residual branch taken before the ReLU) are
left alone.
"""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax

from ..frontend.graph import use_counts
from ..schedules.compute import KERNEL_ATTR, rebuild_kernel

__all__ = ["fuse_activations"]

LAYER_ATTR = "flexiq.layer"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _scalar(e):
    """A float from a scalar relax constant or PrimValue (the torch frontend's clip bounds), else None."""
    if isinstance(e, relax.Var):
        return None
    v = getattr(e, "value", None)
    if v is None:
        return None
    if hasattr(v, "numpy"):
        arr = v.numpy()
        return float(arr) if arr.size == 1 else None
    try:
        return float(v.value if hasattr(v, "value") else v)
    except (TypeError, ValueError):
        return None


def _bound(call, var):
    """(lo, hi) when `call` is an activation of `var` alone, else None."""
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return None
    name = call.op.name
    args = list(call.args)
    if not args or not any(a.same_as(var) for a in args):
        return None
    if name == "relax.nn.relu" and args[0].same_as(var):
        return 0.0, None
    if name == "relax.clip" and args[0].same_as(var):
        lo, hi = _scalar(args[1]), _scalar(args[2])
        return None if lo is None or hi is None else (lo, hi)
    if name in ("relax.maximum", "relax.minimum") and len(args) == 2:
        other = args[1] if args[0].same_as(var) else args[0]
        c = _scalar(other)
        if c is None or other.same_as(var):
            return None
        return (c, None) if name == "relax.maximum" else (None, c)
    return None


def _combine(a, b):
    lo = b[0] if a[0] is None else (a[0] if b[0] is None else max(a[0], b[0]))
    hi = b[1] if a[1] is None else (a[1] if b[1] is None else min(a[1], b[1]))
    return lo, hi


def fuse_activations(mod: tvm.IRModule) -> tvm.IRModule:
    main = mod["main"]
    uses = Counter(use_counts(main))
    bindings = [b for block in main.body.blocks for b in block.bindings]
    user_of = {}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            user_of.setdefault(v, []).append(b)
    layer_funcs = {gv.name_hint: gv for gv, f in mod.functions_items()
                   if isinstance(f, relax.Function) and f.attrs is not None and LAYER_ATTR in f.attrs}
    fused = {}        # layer name -> (lo, hi)
    aliases = {}      # activation binding var -> the var it now aliases
    for b in bindings:
        v = b.value
        if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar) and v.op.name_hint in layer_funcs):
            continue
        cur, bounds = b.var, None
        # a chain of single-use activations: relu / clip / maximum -> minimum
        while uses[cur] == 1 and len(user_of.get(cur, [])) == 1:
            nxt = user_of[cur][0]
            bd = _bound(nxt.value, cur)
            if bd is None:
                break
            bounds = bd if bounds is None else _combine(bounds, bd)
            aliases[nxt.var] = cur
            cur = nxt.var
        if bounds is not None:
            fused[v.op.name_hint] = bounds
    if not fused:
        return mod

    # the rewrite's BlockBuilder shares structurally equal kernels between layers, so a fused
    # kernel is a new PrimFunc that only this layer's call points to
    bb = relax.BlockBuilder(mod)
    for name, bounds in fused.items():
        gv = layer_funcs[name]
        f = mod[gv]
        blocks = []
        for block in f.body.blocks:
            bs = []
            for b in block.bindings:
                c = b.value
                if isinstance(c, relax.Call) and c.op.same_as(_CALL_TIR):
                    k = mod[c.args[0]]
                    if str(k.attrs.get(KERNEL_ATTR, "")) in ("conv2d_int8", "dense_int8"):
                        kgv = bb.add_func(rebuild_kernel(k, act=bounds), c.args[0].name_hint + "_act")
                        b = relax.VarBinding(b.var, relax.Call(c.op, [kgv] + list(c.args[1:]), c.attrs,
                                                               c.ty_args))
                bs.append(b)
            blocks.append(type(block)(bs))
        bb.update_func(gv, relax.Function(f.params, relax.SeqExpr(blocks, f.body.body), f.ret_ty, f.is_pure,
                                          f.attrs))
    mod = bb.get()
    main = mod["main"]
    blocks = []
    for block in main.body.blocks:
        bs = [relax.VarBinding(b.var, aliases[b.var]) if b.var in aliases else b for b in block.bindings]
        blocks.append(type(block)(bs))
    out = dict(mod.functions_items())
    out[mod.get_global_var("main")] = relax.Function(main.params, relax.SeqExpr(blocks, main.body.body),
                                                      main.ret_ty, main.is_pure, main.attrs)
    new = tvm.IRModule(out, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(out)
    return relax.transform.CanonicalizeBindings()(relax.transform.Normalize()(new))
