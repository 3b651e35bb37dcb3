"""Lower the stored weights once per ratio change instead of on every call.

The rewrite emits, inside every layer function, `wl = lower_weight(W, counts, rank, w_shift)`:
the INT8 weight with its low channels lowered, re-laid out for the kernel. Its result depends
only on `counts`, so recomputing it on every inference is waste (MobileNetV2 on 2 cores: about a
third of a batch-1 call, the 1280x1000 classifier alone ~5 ms). This pass moves all of them into
one Relax function

    flexiq_lower_weights(counts) -> (wl_0, wl_1, ...)

and gives `main` a trailing parameter `flexiq_weights` (that tuple), which each layer function
receives as a new last argument. The weights are stored pre-packed in the kernel layout
(`compute.prepack_weight`), so the lowering itself is one vectorized elementwise pass.
`CompiledModel` calls `flexiq_lower_weights` when the ratio changes (and caches the result per
ratio), so a call at a steady ratio does no weight work at all.

Only deployment builds are rewritten: a layer whose rank / shift tables are run-time parameters
(the search build) leaves the module unchanged. The integers are the same as before (same
`lower_expr`, same layout), so the artifact stays bit-exact with the reference.
"""
from __future__ import annotations

from typing import List

import tvm
from tvm import relax

from ..quant.plan import RUNTIME_WEIGHTS_FUNC
from ..schedules import compute
from ..schedules.compute import KERNEL_ATTR

__all__ = ["LOWER_WEIGHTS_FUNC", "WEIGHTS_PARAM", "hoist_weight_lowering", "HoistWeightLowering"]

LOWER_WEIGHTS_FUNC = RUNTIME_WEIGHTS_FUNC     # the name the run-time contract (quant/plan.py) calls
WEIGHTS_PARAM = "flexiq_weights"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _kernel_kind(mod, gv):
    f = mod[gv]
    if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs:
        return str(f.attrs[KERNEL_ATTR])
    return None


def _find_lowering(mod, func):
    """The `lower_weight` binding of a layer function, or None when it cannot be hoisted."""
    found = None
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if not (isinstance(v, relax.Call) and v.op.same_as(_CALL_TIR)):
                continue
            if _kernel_kind(mod, v.args[0]) != "lower_weight":
                continue
            w, counts, rank, wshift = v.args[1].fields
            if not all(isinstance(a, tvm.ir.Constant) for a in (w, rank, wshift)):
                return None
            if not any(counts.same_as(p) for p in func.params):
                return None
            found = (b, v)
    return found


def _take_as_param(func, binding, param):
    """`func` with `binding`'s value replaced by `param`, a new last parameter."""
    blocks = []
    for block in func.body.blocks:
        bindings = [relax.VarBinding(b.var, param) if b.same_as(binding) else b for b in block.bindings]
        blocks.append(type(block)(bindings))
    body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(list(func.params) + [param], body, func.ret_ty, func.is_pure, func.attrs)


@relax.expr_functor.mutator
class _AppendWeightArgs(relax.PyExprMutator):
    def __init__(self, mod, slots, weights):
        super().__init__(mod)
        self.slots = slots          # old layer function name -> (its new GlobalVar, tuple index)
        self.weights = weights

    def visit_call_(self, call):
        if isinstance(call.op, tvm.ir.GlobalVar) and call.op.name_hint in self.slots:
            gv, k = self.slots[call.op.name_hint]
            args = [self.visit_expr(a) for a in call.args]
            return relax.Call(gv, args + [relax.TupleGetItem(self.weights, k)], call.attrs)
        return super().visit_call_(call)


def hoist_weight_lowering(mod: tvm.IRModule) -> tvm.IRModule:
    """The module with every layer's weight lowering moved to `flexiq_lower_weights(counts)`."""
    layers = []
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function) and f.attrs is not None and "flexiq.layer" in f.attrs:
            found = _find_lowering(mod, f)
            if found is None:
                return mod
            layers.append((int(f.attrs["flexiq.layer"]), gv, f, found))
    if not layers or LOWER_WEIGHTS_FUNC in [g.name_hint for g in mod.get_global_vars()]:
        return mod
    layers.sort(key=lambda t: t[0])
    main = mod["main"]
    counts_param = next(p for p in main.params if p.name == "counts")
    L = int(counts_param.ty.shape.values[0])

    # the layer functions change signature: rebuilt under new GlobalVars (a GlobalVar carries its
    # function's type), their old ones dropped
    layer_names = {gv.name_hint for _, gv, _, _ in layers}
    kept = {gv: f for gv, f in mod.functions_items() if gv.name_hint not in layer_names}
    bb = relax.BlockBuilder(tvm.IRModule(kept, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(kept))
    counts = relax.Var("counts", relax.TensorType([L], "int32"))
    slots, wl_types = {}, []
    with bb.function(LOWER_WEIGHTS_FUNC, [counts], attrs={"num_input": 1}):
        with bb.dataflow():
            outs: List[relax.Expr] = []
            for k, (index, gv, f, (binding, call)) in enumerate(layers):
                w, _, rank, wshift = call.args[1].fields
                pf = mod[call.args[0]]
                layout, ob = str(pf.attrs["flexiq.layout"]), int(pf.attrs["flexiq.ob"])
                groups = int(pf.attrs["flexiq.groups"])
                w_np = w.value.numpy()
                wshift_np = wshift.value.numpy()
                pre = compute.lower_weight(
                    w_np.shape, groups=groups, n_groups=int(wshift_np.shape[1]), layer_index=index,
                    num_layers=L, in_channels=int(rank.value.numpy().shape[0]), ob=ob,
                    layout=None if layout == "OIo" else layout, w_prepacked=True)
                packed = compute.prepack_weight(w_np, groups if w_np.ndim == 4 else 1, ob,
                                                None if layout == "OIo" else layout)
                pgv = bb.add_func(pre, f"flexiq_lower_weight_packed_{index}")
                out_ty = call.ty
                outs.append(bb.emit(relax.call_tir(pgv, [relax.const(packed), counts, rank, wshift], out_ty)))
                wl_types.append(out_ty)
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result)

    for k, (index, gv, f, (binding, call)) in enumerate(layers):
        param = relax.Var("wl", wl_types[k])
        slots[gv.name_hint] = (bb.add_func(_take_as_param(f, binding, param), gv.name_hint), k)
    mod = bb.get()

    weights = relax.Var(WEIGHTS_PARAM, relax.TupleType(wl_types))
    mutator = _AppendWeightArgs(mod, slots, weights)
    new_main = mutator.visit_expr(mod["main"])
    attrs = dict(main.attrs) if main.attrs is not None else {}
    if "num_input" in attrs:
        attrs["num_input"] = int(attrs["num_input"]) + 1
    new_main = relax.Function(list(new_main.params) + [weights], new_main.body, new_main.ret_ty,
                              new_main.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))
    mod = mutator.builder_.get()
    mod["main"] = new_main
    mod = relax.transform.DeadCodeElimination([g.name_hint for g, f in mod.functions_items()
                                               if isinstance(f, relax.Function) and f.attrs is not None
                                               and "global_symbol" in f.attrs])(mod)
    return relax.transform.CanonicalizeBindings()(relax.transform.Normalize()(mod))


@tvm.transform.module_pass(opt_level=0, name="HoistWeightLowering")
class HoistWeightLowering:
    """Module pass form of :func:`hoist_weight_lowering`."""

    def transform_module(self, mod, _ctx):
        return hoist_weight_lowering(mod)
