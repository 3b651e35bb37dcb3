"""The FlexiQ rewrite: every quantizable layer becomes one FlexiQ layer function.

For layer i, `main` calls a private Relax function `flexiq_layer_i(x, counts)` carrying attributes
`flexiq.op` ("conv2d" / "dense"), `flexiq.layer` (the index) and `flexiq.name`; its body is the
target-neutral decomposition into three TIR kernels from `schedules.compute`:

    q  = quantize_act(x, counts, rank, act_shift)      # INT8 codes, low channels bit-extracted
    wl = lower_weight(w_int8, counts, rank, w_shift)    # stored INT8 weights, low channels lowered
    y  = conv2d_int8 / dense_int8(q, wl, scale, bias)   # int32 accumulation, dequantize + bias

`counts` (int32, one entry per layer: the number of leading 4-bit groups) is a new run-time
parameter of `main`, so a ratio change is an integer update: nothing is recompiled or copied.
Weights are stored once, as INT8 constants, in original channel order; the lowering order reaches
the kernels as a per-channel group-rank table (`rank[c] < counts[i]` means channel c is 4-bit), so
no activation gather is needed on targets that reduce over all channels in one pass. Targets find
the kernels by their `flexiq.kernel` attribute and schedule them (see `targets/`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import tvm
from tvm import relax

from ..frontend.layers import FoundLayer
from ..quant.int8 import dequant_scale
from ..quant.layer import ACT_SCALE_ATTR, GEOMETRY_ATTR
from ..quant.plan import Plan
from ..schedules import compute

LAYER_FUNC_PREFIX = "flexiq_layer_"


def _tensor(shape, dtype):
    return relax.TensorType([int(s) for s in shape], dtype)


def _emit_layer(bb: relax.BlockBuilder, index: int, num_layers: int, found: FoundLayer, lplan, batch: int,
                out: str = "float", runtime_tables: bool = False, runtime_bias: bool = False,
                bias_table: Optional[np.ndarray] = None, dynamic: bool = False) -> tvm.ir.GlobalVar:
    spec = found.spec
    unsigned = bool(lplan.act_unsigned)
    act_dtype = "uint8" if unsigned else "int8"
    q_w = lplan.int8_weight(spec.weight)
    # static: the shift of each channel's group; dynamic: the calibrated offset below the live max rule
    per_group = lplan.act_dynamic_offset if dynamic else lplan.act_shift
    act_shift = relax.const(np.asarray(per_group, dtype=np.int32)[lplan.rank])
    if runtime_tables:
        rank = relax.Var("rank", _tensor((spec.in_channels,), "int32"))
        w_shift = relax.Var("w_shift", _tensor(lplan.weight_shift.shape, "int32"))
        extra = [rank, w_shift]
    else:
        rank = relax.const(lplan.rank.astype(np.int32))
        w_shift = relax.const(np.ascontiguousarray(lplan.weight_shift, dtype=np.int32))
        extra = []
    scale = relax.const(dequant_scale(lplan.weight_scale, np.float32(lplan.act_scale)))
    bias_row = None
    if runtime_bias:
        bias = relax.Var("bias", _tensor((spec.out_channels,), "float32"))
        extra_bias = [bias]
    elif bias_table is not None:
        bias_row = relax.Var("bias_row", _tensor((1,), "int32"))
        extra_bias = [bias_row]
    else:
        bias = relax.const(np.asarray(spec.bias, dtype=np.float32))
        extra_bias = []
    in_shape = (batch,) + tuple(spec.in_shape)
    out_shape = (batch,) + tuple(spec.out_shape)
    tag = f"{index}_{spec.name}"

    x = relax.Var("x", _tensor(in_shape, "float32"))
    counts = relax.Var("counts", _tensor((num_layers,), "int32"))
    attrs = {"flexiq.op": spec.op, "flexiq.layer": index, "flexiq.name": spec.name}
    with bb.function(f"{LAYER_FUNC_PREFIX}{index}", [x, counts] + extra + extra_bias, attrs=attrs, private=True):
        with bb.dataflow():
            if bias_row is not None:
                # accuracy recovery: the bias of the current ratio level, picked at run time
                picked = bb.emit(relax.op.take(relax.const(bias_table.astype(np.float32)), bias_row, axis=0,
                                                  mode="clip"))
                bias = bb.emit(relax.op.reshape(picked, (spec.out_channels,)))
            if spec.op == "conv2d":
                pt, pl, pb, pr = spec.padding
                qf = compute.quantize_act(in_shape, 1, pad=(pt, pl, pb, pr), scale=lplan.act_scale,
                                          unsigned=unsigned, layer_index=index, num_layers=num_layers,
                                          dynamic=dynamic, n_groups=lplan.n_groups)
                padded = (batch, spec.in_channels, in_shape[2] + pt + pb, in_shape[3] + pl + pr)
                wf = compute.lower_weight(q_w.shape, groups=spec.groups, n_groups=lplan.n_groups,
                                          layer_index=index, num_layers=num_layers, in_channels=spec.in_channels)
                wl_shape = compute.conv_weight_layout_shape(q_w.shape, spec.groups)
                kf = compute.conv2d_int8(padded, q_w.shape, strides=spec.strides, dilation=spec.dilation,
                                         groups=spec.groups, unsigned=unsigned)
                x2d, q_shape = x, padded
                q_in, q_out_shape = x2d, q_shape
            else:
                rows = int(np.prod(in_shape[:-1]))
                x2d = bb.emit(relax.op.reshape(x, (rows, spec.in_channels))) if len(in_shape) != 2 else x
                q_shape = (rows, spec.in_channels)
                # dynamic extraction takes its maxima per sample (batch row): an N-D input
                # (batch, tokens..., C) is quantized before the reshape
                q_in, q_out_shape = (x, in_shape) if dynamic and len(in_shape) != 2 else (x2d, q_shape)
                qf = compute.quantize_act(q_out_shape, len(q_out_shape) - 1, pad=0, scale=lplan.act_scale,
                                          unsigned=unsigned, layer_index=index, num_layers=num_layers,
                                          dynamic=dynamic, n_groups=lplan.n_groups)
                wf = compute.lower_weight(q_w.shape, groups=1, n_groups=lplan.n_groups, layer_index=index,
                                          num_layers=num_layers, in_channels=spec.in_channels)
                wl_shape = compute.dense_weight_layout_shape(q_w.shape)
                kf = compute.dense_int8(q_shape, q_w.shape, unsigned=unsigned)
            # the layer's geometry travels with its kernels (targets read it instead of re-deriving it)
            geom = spec.geometry(batch).to_attrs()
            qf = qf.with_attr(GEOMETRY_ATTR, geom).with_attr(ACT_SCALE_ATTR, float(np.float32(lplan.act_scale)))
            kf = kf.with_attr(GEOMETRY_ATTR, geom)
            gq = bb.add_func(qf, f"flexiq_quantize_{tag}")
            gw = bb.add_func(wf, f"flexiq_lower_weight_{tag}")
            gk = bb.add_func(kf, f"flexiq_{spec.op}_{tag}")
            q = bb.emit(relax.call_tir(gq, [q_in, counts, rank, act_shift], _tensor(q_out_shape, act_dtype)))
            if tuple(q_out_shape) != tuple(q_shape):
                q = bb.emit(relax.op.reshape(q, q_shape))
            wl = bb.emit(relax.call_tir(gw, [relax.const(q_w), counts, rank, w_shift], _tensor(wl_shape, "int8")))
            y_shape = out_shape if spec.op == "conv2d" else (q_shape[0], spec.out_channels)
            y = bb.emit(relax.call_tir(gk, [q, wl, scale, bias], _tensor(y_shape, "float32")))
            if spec.op == "dense" and len(in_shape) != 2:
                y = bb.emit(relax.op.reshape(y, out_shape))
            result = bb.emit_output(y)
        bb.emit_func_output(result)
    return bb.get().get_global_var(f"{LAYER_FUNC_PREFIX}{index}")


@relax.expr_functor.mutator
class _ReplaceLayers(relax.PyExprMutator):
    def __init__(self, mod, layers: Sequence[FoundLayer], layer_gvars, counts: relax.Var, originals, tables=None,
                 biases=None):
        super().__init__(mod)
        self.tables = tables
        self.biases = biases
        self.layers = layers
        self.layer_gvars = layer_gvars
        self.counts = counts
        self.calls = originals          # original call of each layer, matched by identity
        self.bias_adds = [l.bias_var for l in layers]

    def visit_var_binding_(self, binding):
        for i, bias_var in enumerate(self.bias_adds):
            if bias_var is not None and binding.var.same_as(bias_var):
                # the bias is already added by the layer's epilogue: alias the layer's output
                binding = relax.VarBinding(binding.var, self.layers[i].var)
                break
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        for i, orig in enumerate(self.calls):
            if call.same_as(orig):
                x = self.visit_expr(call.args[0])
                extra = list(self.tables[i]) if self.tables else []
                if self.biases is not None:
                    extra.append(self.biases[i])
                return relax.Call(self.layer_gvars[i], [x, self.counts] + extra)
        return super().visit_call_(call)


def bias_tables(layers: Sequence[FoundLayer], plan: Plan) -> Optional[List[np.ndarray]]:
    """Per layer (1 + corrected levels, O): row 0 the model's bias, then one row per corrected level."""
    if not plan.bias_correction:
        return None
    levels = sorted(plan.bias_correction)
    return [np.stack([f.spec.bias] + [f.spec.bias - plan.bias_correction[r][i] for r in levels]).astype(np.float32)
            for i, f in enumerate(layers)]


def flexiq_rewrite(mod: tvm.IRModule, layers: Sequence[FoundLayer], plan: Plan, batch: int,
                   runtime_tables: bool = False, runtime_bias: bool = False) -> tvm.IRModule:
    """Returns a module whose `main(x, counts)` runs every layer of `layers` through FlexiQ.

    `runtime_tables=True` (the search build) also makes each layer's group-rank table and weight
    shift table run-time parameters of `main` (`rank_i`, `w_shift_i` after `counts`), so a search
    can try other group orders without recompiling; deployment builds keep them constant.
    `runtime_bias=True` (the recovery build) makes each layer's bias a parameter `bias_i`. A plan
    with bias corrections gets per-layer bias tables and a `bias_row` (int32, shape (1,)) parameter
    after `counts` that selects the row of the current ratio level.
    `plan.dynamic` (dynamic extraction) builds every quantize kernel with `dynamic=True`: the
    activation shifts come from the live tensor, per sample and group (`act_shift` is unused).
    """
    main = mod["main"]
    batch_var = main.params[0].ty.shape.values[0]
    if not isinstance(batch_var, tvm.tirx.IntImm):
        main = main.bind_symbolic_vars({batch_var: int(batch)})
    elif int(batch_var) != int(batch):
        raise ValueError(f"the model's batch size is fixed at {int(batch_var)}, cannot compile for {batch}")
    # keep the module's other functions (a user's module may call PrimFuncs or helpers from main)
    funcs = {gv: (main if gv.name_hint == "main" else f) for gv, f in mod.functions_items()}
    mod = tvm.IRModule(funcs, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(funcs)
    mod = relax.transform.Normalize()(mod)
    main = mod["main"]
    # re-find the layers in the batch-bound function (same order, same predicate)
    from ..frontend.layers import find_layers

    bound = find_layers(main, warn=False)
    if [f.spec.name for f in bound] != [f.spec.name for f in layers]:
        raise ValueError("internal: layer discovery changed after binding the batch size")
    L = len(bound)
    bb = relax.BlockBuilder(mod)
    tables_b = None if runtime_bias else bias_tables(bound, plan)
    gvars = [_emit_layer(bb, i, L, f, plan.layers[i], batch, runtime_tables=runtime_tables,
                         runtime_bias=runtime_bias, bias_table=None if tables_b is None else tables_b[i],
                         dynamic=bool(getattr(plan, "dynamic", False)))
             for i, f in enumerate(bound)]
    mod = bb.get()
    from ..frontend.graph import bindings

    originals = []
    for f in bound:
        originals.append(next(b.value for b in bindings(main) if b.var.same_as(f.var)))
    counts = relax.Var("counts", _tensor((L,), "int32"))
    tables = None
    if runtime_tables:
        tables = [(relax.Var(f"rank_{i}", _tensor((p.in_channels,), "int32")),
                   relax.Var(f"w_shift_{i}", _tensor(p.weight_shift.shape, "int32"))) for i, p in enumerate(plan.layers)]
    biases, bias_params = None, []
    if runtime_bias:
        biases = [relax.Var(f"bias_{i}", _tensor((f.spec.out_channels,), "float32")) for i, f in enumerate(bound)]
        bias_params = biases
    elif tables_b is not None:
        row = relax.Var("bias_row", _tensor((1,), "int32"))
        biases, bias_params = [row] * L, [row]
    mutator = _ReplaceLayers(mod, bound, gvars, counts, originals, tables, biases)
    new_main = mutator.visit_expr(main)
    attrs = dict(main.attrs) if main.attrs is not None else {}
    extra_params = [counts] + bias_params + ([v for t in tables for v in t] if tables else [])
    attrs["num_input"] = 1 + len(extra_params)
    new_main = relax.Function(list(new_main.params) + extra_params, new_main.body, new_main.ret_ty,
                              new_main.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))
    mod = mutator.builder_.get()
    mod["main"] = new_main
    return relax.transform.CanonicalizeBindings()(relax.transform.Normalize()(mod))
