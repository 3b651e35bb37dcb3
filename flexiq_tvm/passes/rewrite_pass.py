"""`FlexiQRewrite`: the FlexiQ rewrite as a `tvm.transform.Pass` that works on any Relax module.

`flexiq_rewrite` (flexiq_rewrite.py) needs the layers that `load_model` found. This pass finds them
itself, in whatever module a TVM user hands it, after the user's own passes:

1. un-fusing: a call to a Relax function (a `FuseOps` / `FuseOpsByPattern` group, a BYOC
   `Codegen` wrapper with its `Composite` local function, any helper function) that contains a
   conv2d / matmul with a constant weight (a constant inside it, or a parameter whose argument at
   the call site is a constant) is inlined back into `main`. Calls whose matmuls multiply two
   activations (attention) keep their function; so does everything else;
2. discovery: the frontend's `find_layers` on `main` (conv2d NCHW/OIHW any groups, matmul with a
   constant 2-D weight, plus the constant bias add that follows each);
3. matching: the layers' names, geometry, float weights and biases must hash to the plan's model
   fingerprint (`quant.plan.model_fingerprint`). If they do not, the module is normalised the way
   `load_model` prepares models (FoldConstant, FoldBatchNorm, CanonicalizeBindings; e.g. a bias
   that is still `reshape(const)`, or a BatchNorm after a conv) and matched again. A mismatch is an
   error that names the first plan layer not found and what the module has in its place;
4. the rewrite itself (`flexiq_rewrite`): `main(x, counts[, bias_row])`.

Supported: weights as Relax constants (TVM's importers' default), or as parameters bound with
`relax.transform.BindParams` / this pass's `params=` argument (they become constants). Not
supported: modules whose conv2d / matmul ops were already legalized to TIR (`LegalizeOps`, the
first pass of TVM's default pipeline, so also `FuseOps` + `FuseTIR` after it) or converted to
another layout (`ConvertLayout` to NHWC): put FlexiQRewrite before them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import relax

from ..frontend.graph import is_const
from ..frontend.layers import FoundLayer, find_layers
from ..quant.plan import Plan, PlanError, model_fingerprint
from .flexiq_rewrite import flexiq_rewrite
from .fold_bn import FoldBatchNorm

_QUANTIZABLE_OPS = ("relax.nn.conv2d", "relax.matmul")

try:  # a PlanError raised inside the pass reaches the caller as a PlanError, not a RuntimeError
    import tvm_ffi

    tvm_ffi.error.register_error("PlanError", PlanError)
except (ImportError, AttributeError):  # pragma: no cover
    pass
_LEGALIZED_HINTS = ("conv2d", "matmul", "dense")


def _block_bindings(func: relax.Function):
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings]


def _quantizable_inside(func: relax.Function, const_params: set) -> bool:
    """Whether `func` (or a local function it calls) holds a conv2d / matmul whose weight is a
    constant, or one of `const_params` (parameters whose call-site argument is a constant)."""
    local = {}
    for b in _block_bindings(func):
        v = b.value
        if isinstance(v, relax.Function):
            local[b.var] = v
            continue
        if not isinstance(v, relax.Call):
            continue
        if isinstance(v.op, tvm.ir.Op) and str(v.op.name) in _QUANTIZABLE_OPS and len(v.args) >= 2:
            w = v.args[1]
            if is_const(w) or (isinstance(w, relax.Var) and any(w.same_as(p) for p in const_params)):
                return True
        elif isinstance(v.op, relax.Var) and v.op in local:
            inner = local[v.op]
            inner_const = {p for p, a in zip(inner.params, v.args)
                           if is_const(a) or (isinstance(a, relax.Var) and any(a.same_as(c) for c in const_params))}
            if _quantizable_inside(inner, inner_const):
                return True
    return False


@relax.expr_functor.mutator
class _InlineLayerFunctions(relax.PyExprMutator):
    """Inlines into `main` every called Relax function that holds a quantizable op."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.inlined: List[str] = []

    def _callee(self, call) -> Tuple[Optional[relax.Function], str]:
        op = call.op
        if isinstance(op, tvm.ir.GlobalVar):
            f = self.mod_[op]
            if isinstance(f, relax.Function):
                return f, op.name_hint
        return None, ""

    def visit_var_binding_(self, binding):
        v = binding.value
        if isinstance(v, relax.Call):
            callee, name = self._callee(v)
            if callee is not None:
                const_params = {p for p, a in zip(callee.params, v.args) if is_const(a)}
                if _quantizable_inside(callee, const_params):
                    args = [self.visit_expr(a) for a in v.args]
                    result = self._inline(callee, args)
                    self.inlined.append(name)
                    super().visit_var_binding_(relax.VarBinding(binding.var, result))
                    return
        super().visit_var_binding_(binding)

    def _inline(self, callee: relax.Function, args) -> relax.Expr:
        f = relax.utils.copy_with_new_vars(callee)
        f = f.bind_params({p: a for p, a in zip(f.params, args)})
        local = {}
        for b in _block_bindings(f):
            v = b.value
            if isinstance(v, relax.Function):
                local[b.var] = v
                continue
            if isinstance(v, relax.Call) and isinstance(v.op, relax.Var) and v.op in local:
                res = self._inline(local[v.op], list(v.args))
                self.builder_.emit_normalized(relax.VarBinding(b.var, res))
                continue
            self.builder_.emit_normalized(b)
        return f.body.body


def unfuse_layers(mod: tvm.IRModule, func_name: str = "main") -> Tuple[tvm.IRModule, List[str]]:
    """`mod` with every function call of `func_name` that holds a conv2d / matmul with a constant
    weight inlined; returns the module and the names of the inlined callees (in call order)."""
    mut = _InlineLayerFunctions(mod)
    gv = mod.get_global_var(func_name)
    new = mut.visit_expr(mod[gv])
    if not mut.inlined:
        return mod, []
    out = mut.builder_.get()
    out[gv] = new
    return relax.transform.Normalize()(out), mut.inlined


def _legalized_convs(func: relax.Function) -> List[str]:
    """Names of call_tir PrimFuncs that look like legalized conv2d / matmul ops."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    out = []
    for b in _block_bindings(func):
        v = b.value
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.same_as(call_tir):
            gv = v.args[0]
            name = gv.name_hint if isinstance(gv, tvm.ir.GlobalVar) else ""
            if any(h in name for h in _LEGALIZED_HINTS):
                out.append(name)
    return out


def _describe(found: Sequence[FoundLayer]) -> str:
    def one(f):
        s = f.spec
        if s.op == "conv2d":
            kh, kw = s.kernel_size
            return f"{s.name}({s.in_channels}->{s.out_channels}, {kh}x{kw}, groups={s.groups}, stride={s.strides[0]})"
        return f"{s.name}({s.in_channels}->{s.out_channels})"
    shown = ", ".join(one(f) for f in found[:8])
    return shown + (f", ... ({len(found)} in all)" if len(found) > 8 else "")


def _param_weights(func: relax.Function) -> List[str]:
    """Parameters of `func` used as the weight of a conv2d / matmul (unbound weights)."""
    params = list(func.params)
    out = []
    for b in _block_bindings(func):
        v = b.value
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and str(v.op.name) in _QUANTIZABLE_OPS:
            w = v.args[1] if len(v.args) > 1 else None
            if isinstance(w, relax.Var) and any(w.same_as(p) for p in params[1:]):
                out.append(str(w))
    return out


def _mismatch(plan: Plan, found: Sequence[FoundLayer], func_name: str, legalized: List[str],
              param_weights: List[str]) -> PlanError:
    """The error that says which plan layer is missing and what the module has instead."""
    where = f"the module's {func_name!r}"
    if param_weights and len(found) < plan.num_layers:
        return PlanError(f"FlexiQRewrite: {where} has {len(found)} quantizable layers with constant weights, the plan "
                         f"{plan.num_layers}; {len(param_weights)} conv2d/matmul weights are parameters of "
                         f"{func_name!r} ({', '.join(param_weights[:4])}{', ...' if len(param_weights) > 4 else ''}): "
                         "bind them first (FlexiQRewrite(plan, params=...) or relax.transform.BindParams)")
    if legalized and len(found) < plan.num_layers:
        return PlanError(f"FlexiQRewrite: {where} has {len(found)} Relax conv2d/matmul layers but the plan has "
                         f"{plan.num_layers}; the ops were already legalized to TIR ({', '.join(legalized[:4])}"
                         f"{', ...' if len(legalized) > 4 else ''}). Run FlexiQRewrite before LegalizeOps / "
                         "FuseTIR (before tvm.compile's pipeline)")
    for i, lp in enumerate(plan.layers):
        if i >= len(found):
            return PlanError(f"FlexiQRewrite: plan layer {i} {lp.name!r} ({lp.op}, {lp.in_channels}->"
                             f"{lp.out_channels}, groups={lp.groups}) not found in {where}: it has only "
                             f"{len(found)} quantizable layers: {_describe(found) or 'none'}")
        s = found[i].spec
        if (s.name, s.op, s.in_channels, s.out_channels, s.groups) != (lp.name, lp.op, lp.in_channels,
                                                                         lp.out_channels, lp.groups):
            return PlanError(f"FlexiQRewrite: plan layer {i} {lp.name!r} ({lp.op}, {lp.in_channels}->"
                             f"{lp.out_channels}, groups={lp.groups}) not found in {where}; in its place the "
                             f"module has {_describe([found[i]])} (quantizable layers found: {_describe(found)})")
    if len(found) > plan.num_layers:
        return PlanError(f"FlexiQRewrite: {where} has {len(found)} quantizable layers, the plan {plan.num_layers}; "
                         f"extra: {_describe(found[plan.num_layers:])}")
    return PlanError(f"FlexiQRewrite: {where} has the plan's {plan.num_layers} layers with the same geometry, but "
                     f"their weights, biases or input shapes differ from the model the plan was made for "
                     f"(fingerprint {model_fingerprint([f.spec for f in found])[:12]}... != plan's "
                     f"{plan.fingerprint[:12]}...). Fold BatchNorm and constants the same way, or quantize this "
                     "model")


def _normalize(mod: tvm.IRModule) -> tvm.IRModule:
    """What `load_model` does to a module before finding layers (frontend/model.py `prepare`)."""
    return tvm.transform.Sequential([relax.transform.FoldConstant(), FoldBatchNorm, relax.transform.FoldConstant(),
                                     relax.transform.CanonicalizeBindings()])(mod)


def find_plan_layers(mod: tvm.IRModule, plan: Plan, func_name: str = "main"
                     ) -> Tuple[tvm.IRModule, List[FoundLayer], List[str]]:
    """(module, layers, inlined function names): the plan's layers found in `func_name` of `mod`
    (un-fused and normalised if needed, see the module docstring), or a PlanError naming what is
    missing."""
    if func_name not in [g.name_hint for g in mod.get_global_vars()]:
        raise PlanError(f"FlexiQRewrite: the module has no {func_name!r} function")
    mod, inlined = unfuse_layers(mod, func_name)
    found = find_layers(mod[func_name], warn=False)
    if model_fingerprint([f.spec for f in found]) == plan.fingerprint:
        return mod, found, inlined
    norm = _normalize(mod)
    found_n = find_layers(norm[func_name], warn=False)
    if model_fingerprint([f.spec for f in found_n]) == plan.fingerprint:
        return norm, found_n, inlined
    raise _mismatch(plan, found_n, func_name, _legalized_convs(norm[func_name]), _param_weights(norm[func_name]))


def _bind_weights(mod: tvm.IRModule, params, func_name: str) -> tvm.IRModule:
    if params is None:
        return mod
    if isinstance(params, dict):
        params = params.get(func_name, params)
    func = mod[func_name]
    if not isinstance(params, dict):
        n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else 1
        extra = list(func.params[n_in:])
        if len(params) != len(extra):
            raise ValueError(f"FlexiQRewrite: {func_name} has {len(extra)} weight parameters, {len(params)} params given")
        params = dict(zip(extra, params))
    params = {k: (v if isinstance(v, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(v)))
              for k, v in params.items()}
    return relax.transform.BindParams(func_name, params)(mod)


def flexiq_rewrite_module(mod: tvm.IRModule, plan: Plan, batch_size: int = 1, params=None,
                          func_name: str = "main") -> tvm.IRModule:
    """The body of the `FlexiQRewrite` pass (see there)."""
    if func_name != "main":
        raise NotImplementedError("FlexiQRewrite rewrites the module's 'main' function")
    mod = _bind_weights(mod, params, func_name)
    mod, found, inlined = find_plan_layers(mod, plan, func_name)
    out = flexiq_rewrite(mod, found, plan, int(batch_size))
    if inlined:
        # the fused functions that held the layers are no longer called (BYOC wrappers are public:
        # they are dropped by name, everything else public stays an entry)
        entries = [gv.name_hint for gv, f in out.functions_items()
                   if f.attrs is not None and "global_symbol" in f.attrs and gv.name_hint not in inlined]
        out = relax.transform.DeadCodeElimination(entries)(out)
        used = {g.name_hint for _, f in out.functions_items() if isinstance(f, relax.Function)
                for g in relax.analysis.all_global_vars(f)}
        dead = set(inlined) - used
        if dead:
            out = tvm.IRModule({gv: f for gv, f in out.functions_items() if gv.name_hint not in dead},
                               attrs=out.attrs)
    return out


def FlexiQRewrite(plan, batch_size: int = 1, params=None) -> tvm.transform.Pass:  # noqa: N802 (TVM naming)
    """The FlexiQ rewrite as a module pass (opt_level 0: it always runs).

    plan: a `flexiq_tvm.Plan` or the path of a plan file. batch_size: samples per call of the
    compiled `main` (a symbolic batch axis is bound to it; a fixed one must equal it). params:
    weights that `main` still takes as parameters (a list in parameter order after `num_input`,
    or a dict by name, or `{"main": [...]}` as `relax.frontend.detach_params` returns), bound as
    constants first.

    The result's `main` takes `(x, counts)`, plus `bias_row` after `counts` when the plan carries
    per-ratio bias corrections: `plan.runtime_args(ratio, device)` gives those arrays for a ratio.
    """
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)

    @tvm.transform.module_pass(opt_level=0, name="FlexiQRewrite")
    def _flexiq_rewrite(mod, _ctx):
        return flexiq_rewrite_module(mod, plan, batch_size, params)

    return _flexiq_rewrite
