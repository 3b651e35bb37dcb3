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

Everything else (residual adds, pooling, reshapes, softmax, ...) stays on the host (llvm).
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
    wl = lower_weight(W, counts, rank, wshift); y = conv2d_int8 | dense_int8(q, wl, scale, bias)."""
    x, counts = wildcard(), wildcard()
    q = _call_tir([x, counts, is_const(), is_const()])
    wl = _call_tir([is_const(), counts, is_const(), is_const()])
    y = _call_tir([q, wl, is_const(), is_const()])
    return y, {"x": x, "counts": counts, "q": q, "wl": wl, "y": y}


def kernel_kind(mod: tvm.IRModule, call) -> str:
    gv = call.args[0]
    if not isinstance(gv, tvm.ir.GlobalVar) or gv.name_hint not in [g.name_hint for g in mod.get_global_vars()]:
        return ""
    f = mod[gv]
    if not isinstance(f, tvm.tirx.PrimFunc) or f.attrs is None or KERNEL_ATTR not in f.attrs:
        return ""
    return str(f.attrs[KERNEL_ATTR])


def make_patterns(mod: tvm.IRModule, offload=None):
    """The pattern table; `offload(layer_index) -> bool` may keep chosen layers on the host."""
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
        if bool(qf.attrs.get("flexiq.dynamic", False)):
            return False                     # dynamic extraction: shifts from the live tensor (host)
        if offload is not None and not offload(int(qf.attrs["flexiq.layer_index"])):
            return False
        if relu:
            # the ReLU is fused into the layer: its input must have no other user
            y_var = ctx.value_to_bound_var.get(ann["y"])
            if y_var is None or len(ctx.var_usages.get(y_var, [])) != 1:
                return False
        return True

    y, ann = layer_pattern()
    relu = is_op("relax.nn.relu")(y)
    return [
        FusionPattern(f"{CODEGEN}.layer_relu", relu, dict(ann), lambda ctx: check(ctx, True)),
        FusionPattern(f"{CODEGEN}.layer", y, dict(ann), lambda ctx: check(ctx, False)),
    ]


def inline_layers(mod: tvm.IRModule) -> tvm.IRModule:
    names = [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith(LAYER_FUNC_PREFIX)]
    if not names:
        return mod
    mod = relax.transform.InlinePrivateFunctions()(mod)
    return relax.transform.CanonicalizeBindings()(mod)


def partition(mod: tvm.IRModule, offload=None, merge: bool = True) -> tvm.IRModule:
    """Inline the layer functions, then fuse + annotate the NPU layers (no codegen yet)."""
    mod = inline_layers(mod)
    pats = make_patterns(mod, offload)
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
