"""Makes a function also return chosen intermediate values (calibration and debugging taps).

The original result stays field 0 of the returned tuple; the taps follow in the order given.
"""
from __future__ import annotations

from typing import Sequence

import tvm
from tvm import relax


def tap_function(func: relax.Function, taps: Sequence[relax.Expr]) -> relax.Function:
    """Taps may be variables of `func` or calls on them (for example a reduction of a layer's
    output): calls get their own bindings before the returned tuple."""
    blocks = list(func.body.blocks)
    last = blocks[-1]
    dataflow = isinstance(last, relax.DataflowBlock)
    bb = relax.BlockBuilder()
    extra, fields = [], [func.body.body]
    for i, t in enumerate(taps):
        if isinstance(t, relax.Call):
            t = bb.normalize(t)
            v = (relax.DataflowVar if dataflow else relax.Var)(f"flexiq_tap_{i}", t.ty)
            extra.append(relax.VarBinding(v, t))
            t = v
        fields.append(t)
    out = relax.Var("flexiq_taps", relax.TupleType([f.ty for f in fields]))
    binding = relax.VarBinding(out, relax.Tuple(fields))
    cls = relax.DataflowBlock if dataflow else relax.BindingBlock
    blocks[-1] = cls(list(last.bindings) + extra + [binding])
    return relax.Function(func.params, relax.SeqExpr(blocks, out), out.ty, func.is_pure, func.attrs)


def TapOutputs(taps: Sequence[relax.Expr], func_name: str = "main"):  # noqa: N802
    """Module pass: `func_name` returns (result, *taps)."""

    @tvm.transform.module_pass(opt_level=0, name="FlexiQTapOutputs")
    def _pass(mod, _ctx):
        mod = mod.clone() if hasattr(mod, "clone") else mod
        mod[func_name] = tap_function(mod[func_name], taps)
        return relax.transform.Normalize()(mod)

    return _pass


def flexiq_layer_taps(func: relax.Function):
    """{layer index: (input expr, output var)} of the FlexiQ layer calls in a rewritten `main`."""
    from .flexiq_rewrite import LAYER_FUNC_PREFIX

    taps = {}
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar) and \
                    v.op.name_hint.startswith(LAYER_FUNC_PREFIX):
                taps[int(v.op.name_hint[len(LAYER_FUNC_PREFIX):])] = (v.args[0], b.var)
    return taps
