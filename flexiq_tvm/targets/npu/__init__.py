"""The FlexiQ NPU target (issue 5; docs/npu.md): a systolic-array NPU with 8-bit and dual 4-bit
MACs, reached through TVM's BYOC flow and executed by a bit-exact, cycle-counting simulator.

    partition.py  inline the FlexiQ layer functions, DPL patterns, FuseOpsByPattern +
                  MergeCompositeFunctions (Codegen = "flexiq_npu")
    codegen.py    relax.ext.flexiq_npu: layers -> tiles -> NPU instruction streams -> C source
    runtime.c     the simulator (functional + timing), compiled into the artifact
    config.py     NPUConfig (array, SRAMs, DMA, vector unit, clock) and its validation
    stats.py      decoding of the per-layer cycle table behind `CompiledModel.npu_stats()`
    tune.py       mapping tuning per layer and ratio level (simulator cycles, XGBoost ranker)
    records.py    the tuning records (`<db_dir>/npu/records.json`) that `build(mod, tuning_db)` applies
    vecops.py     which transformer operators (layer norm, softmax, GELU, attention matmuls, reshapes)
                  the vector unit takes, bit-exact with the host kernels

The NPU takes the FlexiQ layers (with a fused ReLU / ReLU6, per-ratio bias rows and dynamic
extraction), the residual adds between them, global average pools and a transformer's token
operators (vector unit); weights that fit the WBUF stay there between calls. Whatever it does not
take (other pooling, layers that do not fit, ...) is built for the host (llvm) in the same artifact.
"""
from __future__ import annotations

import os
import warnings

import tvm
from tvm import relax

from .. import register_target
from ..llvm import LLVMTarget
from . import codegen as _codegen
from .codegen import CODEGEN, STATS_COLS, STATS_FUNC, build_context, extract_layer, plan_tiles
from .config import NPUConfig, NPUConfigError
from .partition import partition

STATS_RELAX_FUNC = "flexiq_npu_stats_get"

__all__ = ["NPUTarget", "NPUConfig", "NPUConfigError", "STATS_RELAX_FUNC"]


def _feasible_layers(mod: tvm.IRModule, cfg: NPUConfig):
    """{layer index: True/False}: whether each FlexiQ layer can be tiled to the NPU's SRAMs."""
    from ...passes.flexiq_rewrite import LAYER_FUNC_PREFIX

    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    ok = {}
    for gv, f in mod.functions_items():
        if not (isinstance(f, relax.Function) and gv.name_hint.startswith(LAYER_FUNC_PREFIX)):
            continue
        try:
            L, _, _, _ = extract_layer(f, {}, prims)
        except Exception as e:           # not a layer shape the NPU knows: host
            warnings.warn(f"flexiq npu: {gv.name_hint} stays on the host ({e})")
            continue
        fits = plan_tiles(L, cfg) is not None
        if not fits:
            warnings.warn(f"flexiq npu: layer {L.layer} ({f.attrs.get('flexiq.name', '')}) does not fit the "
                          f"NPU's SRAMs with this npu_config; it runs on the host")
        ok[L.layer] = fits
    return ok


def _level_counts(mod: tvm.IRModule):
    """Per standard ratio level, the per-layer counts of the plan being built (read from the artifact
    manifest that fq.compile adds): the compiler picks one mapping per layer and level. None when the
    module carries no manifest (then the mapping is chosen for K4 in {0, n/2, n})."""
    import json

    from ...quant.plan import Plan
    from ...quant.schedule import STANDARD_LEVELS
    from ...runtime.compiled import MANIFEST_FUNC

    f = next((f for gv, f in mod.functions_items() if gv.name_hint == MANIFEST_FUNC), None)
    if f is None:
        return None
    try:
        body = f.body.body if hasattr(f.body, "body") else f.body
        plan = Plan.loads(json.loads(str(body.value))["plan"])
        return [plan.counts_for_ratio(r) for r in STANDARD_LEVELS]
    except Exception as e:                                   # a manifest of another shape: default levels
        warnings.warn(f"flexiq npu: cannot read the plan's ratio levels from the manifest ({e})")
        return None


@register_target("npu")
class NPUTarget(LLVMTarget):
    """FlexiQ layers on the simulated NPU, everything else on the host CPU (llvm)."""

    name = "npu"
    # per-ratio bias tables (accuracy recovery): LDREG also loads the bias-row register from the
    # `bias_row` argument, and the vector unit adds that row of the layer's bias table
    supports_bias_rows = True

    def __init__(self, tvm_target=None, schedule: bool = True, npu_config=None, merge: bool = True,
                 tuning_db=None):
        super().__init__(tvm_target, schedule)
        self.config = NPUConfig.from_any(npu_config)
        self.merge = bool(merge)
        self.tuning_db = tuning_db          # default for build(): a tuning directory (tune.py) or None
        self.programs = {}
        self.untuned = []

    def partition(self, mod: tvm.IRModule) -> tvm.IRModule:
        ok = _feasible_layers(mod, self.config)
        return partition(mod, offload=lambda i: ok.get(i, False), merge=self.merge)

    def lower(self, mod: tvm.IRModule, tuning_db=None) -> tvm.IRModule:
        """Partition + codegen; returns the host module (external C module in its attrs).
        tuning_db: a directory holding `npu/records.json` (tune.tune_npu): each layer's tuned mapping
        per ratio level is used where a record matches its geometry, level and configuration; the
        others keep the cost model's choice (one warning lists them)."""
        from ...quant.schedule import STANDARD_LEVELS
        from .records import load_records, records_path

        params = mod["main"].params
        counts = next((p for p in params if str(getattr(p, "name", "")) == "counts"), params[1])
        num_layers = int(counts.ty.shape.values[0])
        levels = _level_counts(mod)
        records = None
        if tuning_db is not None:
            records = load_records(tuning_db)
            if levels is None:
                warnings.warn("flexiq npu: the module carries no plan manifest, so its ratio levels are unknown; "
                              f"the tuning records in {records_path(tuning_db)} are not applied")
        mod = self.partition(mod)
        with build_context(mod, self.config, num_layers, levels, records,
                           list(STANDARD_LEVELS) if levels is not None else None) as ctx:
            mod = relax.transform.RunCodegen()(mod)
            self.programs = dict(ctx.get("programs", {}))
            self.untuned = list(ctx.get("untuned", []))
        if records is not None and self.untuned:
            by_layer = {}
            for name, r, why in self.untuned:
                by_layer.setdefault(name, []).append(f"{r:g}" + ("" if why == "no record" else f" ({why})"))
            warnings.warn(f"flexiq npu: no tuning record in {records_path(tuning_db)} for {len(by_layer)} layer(s); "
                          "they use the cost model's mapping at these levels: "
                          + "; ".join(f"{n}: {', '.join(v)}" for n, v in by_layer.items()))
        if self.programs:
            bb = relax.BlockBuilder(mod)
            with bb.function(STATS_RELAX_FUNC, []):
                out = bb.emit(relax.call_dps_packed(
                    STATS_FUNC, [], out_ty=relax.TensorType([num_layers + 1, STATS_COLS], "float64")))
                bb.emit_func_output(out)
            mod = bb.get()
        return relax.transform.DeadCodeElimination(
            [gv.name_hint for gv, f in mod.functions_items()
             if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs])(mod)

    def build(self, mod: tvm.IRModule, tuning_db=None):
        """tuning_db: a tuning directory (`<dir>/npu/records.json`, see tune.py) or None (then the
        one given to the constructor, if any). The host part is built as for llvm, with the
        directory's llvm records when it holds any besides `npu/`."""
        db = tuning_db if tuning_db is not None else self.tuning_db
        host_db = None
        if db is not None and os.path.isdir(db) and set(os.listdir(db)) - {"npu"}:
            host_db = db        # the directory also holds host (llvm) records (flexiq_tvm.tuning): apply them
        return super().build(self.lower(mod, db), host_db)
