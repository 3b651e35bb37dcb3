"""BYOC partitioning of a FlexiQ-rewritten module for the NPU.

The rewrite (passes/flexiq_rewrite.py) gives every layer a private Relax function
`flexiq_layer_i(x, counts)` whose body is three `call_tir`s (quantize_act, lower_weight,
conv2d_int8 / dense_int8, found by the PrimFunc attribute `flexiq.kernel`). Here we

1. inline those functions into `main` (`InlinePrivateFunctions`), so that a layer and the ReLU
   after it are adjacent bindings of one dataflow block;
2. match each layer (three call_tirs, constant operands, optionally the ReLU that follows) with DPL
   patterns named `flexiq_npu.layer` / `flexiq_npu.layer_relu`; a check function looks the called
   PrimFuncs up by their `flexiq.kernel` attribute (the names vary per layer) and rejects layers
   the NPU cannot take (accumulator-output debug kernels, a ReLU whose input is used elsewhere);
3. `FuseOpsByPattern(bind_constants=True)` + `MergeCompositeFunctions()`: chains of NPU layers
   become one external function with attribute `Codegen = "flexiq_npu"`; the codegen turns each
   into one NPU program (intermediate activations stay INT8, requantized by the vector unit).

A ReLU6 (clip, or ONNX Clip imported as minimum(maximum(y, 0), 6)) fuses like a ReLU; the
per-ratio bias table (take + reshape) is part of the layer; a residual add of two float32 NCHW
tensors of one shape is its own composite (`flexiq_npu.add`, vector unit) and merges with the
layers around it, and so is a global average pool (`mean` over H, W of a float32 NCHW tensor,
optionally flattened: `flexiq_npu.pool` / `pool_flat`). A transformer's other operators (layer
norm, softmax, erf GELU, elementwise ops with constants, float32 attention matmuls, reshapes,
transposes, constant slices, concat) are single-op composites `flexiq_npu.vec_<op>` checked by
`vecops.vec_spec` (docs/npu.md section 4.3), so a whole transformer stack merges into one NPU
function. Everything else (other pooling, ops over other axes, ...) stays on the host (llvm).
"""
from __future__ import annotations


import tvm
from tvm import relax
from tvm.relax.dpl import GlobalVarPattern, is_const, is_op, is_tuple, wildcard

from ...passes.flexiq_rewrite import LAYER_FUNC_PREFIX
from ...schedules.compute import KERNEL_ATTR

CODEGEN = "flexiq_npu"


def _call_tir(args):
    return is_op("relax.call_tir")(GlobalVarPattern(""), is_tuple(args))


def layer_pattern():
    """(root, annotations) of one FlexiQ layer: q = quantize_act(x, counts, rank, shift);
    wl = lower_weight(W, counts, rank, wshift); y = conv2d_int8 | dense_int8(q', wl, scale, bias).
    q' is q or reshape(q) (dynamic extraction quantizes token inputs before folding the tokens);
    bias is a constant or reshape(take(table, bias_row)) (per-ratio bias rows, accuracy recovery)."""
    x, counts = wildcard(), wildcard()
    q = _call_tir([x, counts, is_const(), is_const()])
    q_in = q | is_op("relax.reshape")(q, wildcard())
    wl = _call_tir([is_const(), counts, is_const(), is_const()])
    take = is_op("relax.take")(is_const(), wildcard())
    bias = is_const() | is_op("relax.reshape")(take, wildcard())
    y = _call_tir([q_in, wl, is_const(), bias])
    return y, {"x": x, "counts": counts, "q": q, "wl": wl, "y": y}


def kernel_kind(mod: tvm.IRModule, call) -> str:
    gv = call.args[0]
    if not isinstance(gv, tvm.ir.GlobalVar) or gv.name_hint not in [g.name_hint for g in mod.get_global_vars()]:
        return ""
    f = mod[gv]
    if not isinstance(f, tvm.tirx.PrimFunc) or f.attrs is None or KERNEL_ATTR not in f.attrs:
        return ""
    return str(f.attrs[KERNEL_ATTR])


def _scalar(e) -> float:
    """A scalar number: a PrimValue (clip bounds) or a one-element constant (maximum / minimum)."""
    v = getattr(e, "value", None)
    if hasattr(v, "numpy"):
        a = v.numpy()
        if a.size != 1:
            raise ValueError("not a scalar")
        return float(a.reshape(-1)[0])
    v = getattr(v, "value", v)
    if v is None:
        raise ValueError("not a number")
    return float(v)


def act_bounds(act):
    """(lo, hi) of a fused activation call: relu, clip, maximum(y, lo), minimum(maximum(y, lo), hi)."""
    name = act.op.name
    if name == "relax.nn.relu":
        return 0.0, float("inf")
    if name == "relax.clip":
        return _scalar(act.args[1]), _scalar(act.args[2])
    if name == "relax.maximum":
        return _scalar(act.args[1]), float("inf")
    if name == "relax.minimum":
        return -float("inf"), _scalar(act.args[1])       # lo comes from the maximum before it
    raise ValueError(f"not an activation: {name}")


def make_patterns(mod: tvm.IRModule, offload=None, add_on_npu: bool = True, pool_on_npu: bool = True,
                  vec_on_npu: bool = True):
    """The pattern table; `offload(layer_index) -> bool` may keep chosen layers on the host;
    `add_on_npu=False` keeps residual adds on the host, `pool_on_npu=False` global pools,
    `vec_on_npu=False` the token-tensor operators (layer norm, softmax, GELU, attention matmuls,
    reshapes / transposes; vecops.py)."""
    from tvm.relax.transform import FusionPattern

    def check(ctx, relu: bool) -> bool:
        ann = ctx.annotated_expr
        if kernel_kind(mod, ann["q"]) != "quantize_act" or kernel_kind(mod, ann["wl"]) != "lower_weight":
            return False
        kf = mod[ann["y"].args[0]]
        if str(kf.attrs[KERNEL_ATTR]) not in ("conv2d_int8", "dense_int8"):
            return False
        if str(kf.attrs.get("flexiq.out", "float")) != "float":
            return False                     # debug builds that return int32 accumulators
        qf = mod[ann["q"].args[0]]
        if offload is not None and not offload(int(qf.attrs["flexiq.layer_index"])):
            return False
        if relu:
            # the ReLU / ReLU6 is fused into the layer: its input must have no other user
            y_var = ctx.value_to_bound_var.get(ann["y"])
            if y_var is None or len(ctx.var_usages.get(y_var, [])) != 1:
                return False
            act = ann["act"]
            try:
                lo, hi = act_bounds(act)
            except ValueError:
                return False                 # bounds that are not scalar numbers
            if not lo < hi:
                return False
            if act.op.name == "relax.minimum":
                # ONNX Clip imports as minimum(maximum(y, lo), hi): the maximum feeds only the minimum
                mx = act.args[0]
                if not isinstance(mx, relax.Var) or len(ctx.var_usages.get(mx, [])) != 1:
                    return False
        return True

    y, ann = layer_pattern()
    mx = is_op("relax.maximum")(y, is_const())
    relu = (is_op("relax.nn.relu")(y) | is_op("relax.clip")(y, wildcard(), wildcard())
            | is_op("relax.minimum")(mx, is_const()) | mx)
    a, b = wildcard(), wildcard()
    add = is_op("relax.add")(a, b)

    def check_add(ctx) -> bool:
        """A residual add on the vector unit: two float32 NCHW tensors of one static shape (no
        broadcasting, no constants); exact, since the NPU adds the same float32 values."""
        ann = ctx.annotated_expr
        try:
            shapes = []
            for k in ("a", "b"):
                e = ann[k]                       # the producing expression (a Call) or a Var
                if isinstance(e, (tvm.ir.GenericConst, tvm.ir.Constant)):
                    return False
                ty = e.ty
                if str(ty.dtype) != "float32":
                    return False
                shapes.append(tuple(int(v) for v in ty.shape.values))
        except (AttributeError, TypeError, ValueError):
            return False
        return add_on_npu and len(shapes[0]) == 4 and shapes[0] == shapes[1]

    amx = is_op("relax.maximum")(add, is_const())
    add_act = (is_op("relax.nn.relu")(add) | is_op("relax.clip")(add, wildcard(), wildcard())
               | is_op("relax.minimum")(amx, is_const()) | amx)

    def check_add_act(ctx) -> bool:
        """add + ReLU / ReLU6 (ResNet-style blocks): the add's result must feed only the activation."""
        if not check_add(ctx):
            return False
        s_var = ctx.value_to_bound_var.get(ctx.annotated_expr["add"])
        if s_var is None or len(ctx.var_usages.get(s_var, [])) != 1:
            return False
        act = ctx.annotated_expr["act"]
        try:
            lo, hi = act_bounds(act)
        except ValueError:
            return False
        if act.op.name == "relax.minimum":
            mx = act.args[0]
            if not isinstance(mx, relax.Var) or len(ctx.var_usages.get(mx, [])) != 1:
                return False
        return lo < hi

    xp = wildcard()
    mean = is_op("relax.mean")(xp)
    flat = is_op("relax.reshape")(mean, wildcard())

    def check_pool(ctx, flat_: bool) -> bool:
        """A global average pool on the vector unit: mean over H and W of a float32 NCHW tensor of
        static shape (keepdims or not), optionally flattened to (N, C) by the reshape after it."""
        if not pool_on_npu:
            return False
        ann = ctx.annotated_expr
        try:
            m = ann["mean"]
            ty = ann["x"].ty
            if str(ty.dtype) != "float32" or len(ty.shape.values) != 4:
                return False
            N, C, _, _ = (int(v) for v in ty.shape.values)
            axes = sorted(int(a) % 4 for a in m.attrs.axis)
            if axes != [2, 3]:
                return False
            if flat_:
                m_var = ctx.value_to_bound_var.get(m)
                if m_var is None or len(ctx.var_usages.get(m_var, [])) != 1:
                    return False
                out = tuple(int(v) for v in ann["flat"].ty.shape.values)
                if out not in ((N, C), (N, C, 1, 1)):
                    return False
        except (AttributeError, TypeError, ValueError):
            return False
        return True

    vec = []
    if vec_on_npu:
        from .vecops import VEC_OPS, NotOnNPU, vec_spec

        def check_vec(ctx) -> bool:
            """A token-tensor operator the vector unit / mover runs bit-exactly (vecops.vec_spec)."""
            try:
                vec_spec(ctx.annotated_expr["root"])
            except (NotOnNPU, AttributeError, TypeError, ValueError):
                return False
            return True

        for op, nargs in VEC_OPS.items():
            root = is_op(op)(*[wildcard() for _ in range(nargs)])
            vec.append(FusionPattern(f"{CODEGEN}.vec_{op.split('.')[-1]}", root, {"root": root}, check_vec))
    return [
        FusionPattern(f"{CODEGEN}.pool_flat", flat, {"x": xp, "mean": mean, "flat": flat},
                      lambda ctx: check_pool(ctx, True)),
        FusionPattern(f"{CODEGEN}.pool", mean, {"x": xp, "mean": mean}, lambda ctx: check_pool(ctx, False)),
        FusionPattern(f"{CODEGEN}.layer_relu", relu, dict(ann, act=relu), lambda ctx: check(ctx, True)),
        FusionPattern(f"{CODEGEN}.layer", y, dict(ann), lambda ctx: check(ctx, False)),
        FusionPattern(f"{CODEGEN}.add_relu", add_act, {"a": a, "b": b, "add": add, "act": add_act}, check_add_act),
        FusionPattern(f"{CODEGEN}.add", add, {"a": a, "b": b, "add": add}, check_add),
    ] + vec


def inline_layers(mod: tvm.IRModule) -> tvm.IRModule:
    names = [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith(LAYER_FUNC_PREFIX)]
    if not names:
        return mod
    mod = relax.transform.InlinePrivateFunctions()(mod)
    return relax.transform.CanonicalizeBindings()(mod)


def _static_int(e, known):
    """The value of an integer expression computed from static shapes (None when it is not one)."""
    if isinstance(e, relax.Var):
        return known.get(e)
    if isinstance(e, (tvm.ir.GenericConst, tvm.ir.Constant)):
        a = e.value.numpy()
        return a if a.dtype.kind in "iub" else None
    return None


def _eval_shape_arith(call, known):
    """ONNX Gather / Split imports compute indices from shapes at run time (shape_of, shape_to_tensor,
    take, add, where). With static shapes they are constants: evaluate them (None when not)."""
    import numpy as np

    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return None
    name = call.op.name
    if name == "relax.shape_of":
        try:
            return np.array([int(v) for v in call.args[0].ty.shape.values], np.int64)
        except (AttributeError, TypeError):
            return None
    vals = [_static_int(a, known) for a in call.args]
    if any(v is None for v in vals):
        return None
    if name == "relax.shape_to_tensor":
        return vals[0]
    if name == "relax.take":
        mode = str(call.attrs.mode)
        i = int(vals[1].reshape(-1)[0]) if vals[1].size == 1 else None
        if i is None or vals[0].ndim != 1:
            return None
        i = i % len(vals[0]) if mode == "wrap" else min(max(i, 0), len(vals[0]) - 1)
        return np.asarray(vals[0][i])
    if name == "relax.add":
        return np.asarray(vals[0] + vals[1])
    if name == "relax.where":
        return np.asarray(np.where(vals[0], vals[1], vals[2]))
    return None


def fold_static_indices(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace run-time indices computed from static shapes by constants in `main` (the attention's
    q / k / v takes of the ViT import), so that the takes become constant slices the NPU reads
    as address patterns; the integer values are the ones the host computes, so nothing changes numerically.
    A constant broadcast_to (the class token) is folded too."""
    import numpy as np

    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    func = mod["main"]
    known = {}
    for block in func.body.blocks:
        for b in block.bindings:
            v = _eval_shape_arith(b.value, known)
            if v is not None:
                known[b.var] = v
    if not known:
        return mod

    @relax.expr_functor.mutator
    class _Fold(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.name == "relax.take" and isinstance(call.args[1], relax.Var) and call.args[1] in known:
                idx = known[call.args[1]]
                return relax.op.take(call.args[0], relax.const(idx, str(idx.dtype)), axis=int(call.attrs.axis),
                                     mode=str(call.attrs.mode))
            if call.op.name == "relax.broadcast_to" and isinstance(call.args[0], (tvm.ir.GenericConst, tvm.ir.Constant)):
                shape = [int(v) for v in call.args[1].values]
                a = call.args[0].value.numpy()
                return relax.const(np.ascontiguousarray(np.broadcast_to(a, shape)), str(a.dtype))
            return call

    new = relax.analysis.remove_all_unused(_Fold(mod).visit_expr(func))
    funcs = {gv: (new if gv.name_hint == "main" else f) for gv, f in mod.functions_items()}
    out = tvm.IRModule(funcs, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(funcs)
    return relax.transform.CanonicalizeBindings()(out)


def partition(mod: tvm.IRModule, offload=None, merge: bool = True, add_on_npu: bool = True,
              pool_on_npu: bool = True, vec_on_npu: bool = True) -> tvm.IRModule:
    """Inline the layer functions, then fuse + annotate the NPU layers (no codegen yet)."""
    mod = inline_layers(mod)
    if vec_on_npu and merge:
        mod = fold_static_indices(mod)
    pats = make_patterns(mod, offload, add_on_npu and merge, pool_on_npu and merge, vec_on_npu and merge)
    entry = [gv.name_hint for gv, f in mod.functions_items()
             if isinstance(f, relax.Function) and (f.attrs is None or "Codegen" not in f.attrs)
             and gv.name_hint in ("main",)]
    if merge:
        mod = relax.transform.FuseOpsByPattern(pats, bind_constants=True, annotate_codegen=False,
                                               entry_functions=entry)(mod)
        mod = relax.transform.MergeCompositeFunctions()(mod)
    else:
        mod = relax.transform.FuseOpsByPattern(pats, bind_constants=True, annotate_codegen=True,
                                               entry_functions=entry)(mod)
    return mod
