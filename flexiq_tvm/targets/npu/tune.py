"""NPU mapping tuning (issue 12, docs/npu.md section 5.1).

For every NPU layer of a model and every standard ratio level, candidate mappings (K chunk, output
block, m-block rows and images, loop order; depthwise: channels per block and rows) are measured
by the simulator's cycle count and the fastest is recorded in `<db_dir>/npu/records.json`, keyed by
the layer's geometry and wiring, the level (with its 4-bit run structure) and the NPU
configuration (records.py). `NPUTarget.build(mod, tuning_db=db_dir)` then uses the records.

Measurement: `codegen.estimate_cycles`, the simulator's scoreboard (runtime.c) replayed for the
layer alone in the same program context (input in the ABUF or DRAM, number of output copies), with
the simulator's cycle formulas; `tests/test_npu_flex.py` and `tests/test_npu_tune.py` check that it
equals the C simulator cycle for cycle on one-layer programs, tuned mappings included. It costs
milliseconds where a C build of the simulator per candidate would cost seconds.

Search: when the layer's space has at most `trials` candidates, all are measured. Otherwise the
cost model's own candidates (the untuned choice, so tuning never loses) and a seeded random sample
are measured first; then an XGBoost model, trained on the measured candidates (features: the
mapping, its block counts and the bytes it moves; target: log cycles), ranks the unmeasured ones
and the best-ranked batch is measured next (plus one random candidate per round for exploration),
until `trials` candidates are measured.
"""
from __future__ import annotations

import math
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from ...errors import FlexiQError
from .codegen import (Tiling, _fit_rows, _rows_needed, candidate_tilings, emit_variant,
                      estimate_cycles, lower_function)
from .config import NPUConfig
from .records import load_records, record_key, records_path, save_records, tiling_fits, tiling_to_dict

DEFAULT_TRIALS = 48


# ------------------------------------------------------------------------------------------ space
def _halvings(v: int, lo: int = 1) -> List[int]:
    out = []
    while v >= lo:
        out.append(v)
        v //= 2
    return out


def _balanced(total: int, cap: int) -> int:
    """The smallest block that covers `total` in as few blocks of at most `cap` as possible."""
    n = -(-total // cap)
    return -(-total // n)


def tuning_space(L, cfg: NPUConfig) -> List[Tiling]:
    """Every legal mapping of layer L considered by the tuner (a superset of the cost model's
    `candidate_tilings`, which come first)."""
    IB, WB, OB = cfg.ibuf_bytes // 2, cfg.wbuf_bytes // 2, cfg.obuf_bytes // 2
    KK = L.KH * L.KW
    C = cfg.cols
    base = candidate_tilings(L, cfg)
    out, seen = [], set()

    def add(t):
        if t not in seen and not tiling_fits(L, cfg, t):
            seen.add(t)
            out.append(t)

    for t in base:
        add(t)

    def m_shapes(jc, ob):
        oh_max, nl_max = _fit_rows(L, cfg, L.Wp, jc, ob, L.OH)
        if not oh_max:
            return []
        ohs = set(_halvings(oh_max)[:5]) | {_balanced(L.OH, oh_max)}
        shapes = set()
        for oh in ohs:
            if oh == L.OH:
                for nl in set(_halvings(nl_max)[:4]) | {_balanced(L.N, nl_max)}:
                    shapes.add((oh, nl))
            else:
                shapes.add((oh, 1))
        return sorted(shapes, reverse=True)

    if L.depthwise:
        jmax = min(L.C, WB // KK)
        jcs = {min(L.C, C * m) for m in (1, 2, 3, 4, 6, 8, 12, 16, 32)} | {jmax, _balanced(L.C, max(jmax, 1))}
        for jc in sorted(j for j in jcs if 1 <= j <= jmax):
            for oh, nl in m_shapes(jc, jc):
                add(Tiling(jc=jc, ob=jc, ohlen=oh, nlen=nl))
        return out
    rows1 = _rows_needed(L, 1)
    min_ob = min(L.opg, C)
    jmax = min(L.Cg, WB // (min_ob * KK), IB // (rows1 * L.Wp))
    if jmax < 1:
        return out
    jcs = set(_halvings(jmax)[:4]) | {_balanced(L.Cg, jmax)}
    for jc in sorted(jcs, reverse=True):
        omax = min(L.opg, WB // (jc * KK), OB // max(1, L.OW * 4))
        if omax < 1:
            continue
        obs = {omax, _balanced(L.opg, omax)} | {C * m for m in (1, 2, 4, 8, 16) if C * m <= omax}
        if omax > C:
            obs.add(omax // C * C)
        for ob in sorted(obs, reverse=True):
            nob = -(-L.opg // ob)
            for oh, nl in m_shapes(jc, ob):
                nm = -(-L.N // nl) * -(-L.OH // oh)
                for order in (("mo", "om") if nob > 1 and nm > 1 else ("mo",)):
                    add(Tiling(jc=jc, ob=ob, ohlen=oh, nlen=nl, order=order))
    return out


def features(L, t: Tiling, k: int) -> List[float]:
    """What the ranker sees of a mapping: the tile sizes, block counts and bytes moved."""
    KK = L.KH * L.KW
    nm = -(-L.N // t.nlen) * -(-L.OH // t.ohlen)
    if L.depthwise:
        nob, nch = -(-L.C // t.jc), 1
        wbytes = L.C * KK
        xbytes = nob * nm * t.nlen * t.jc * _rows_needed(L, t.ohlen) * L.Wp
    else:
        nob, nch = -(-L.opg // t.ob), -(-L.Cg // t.jc)
        single = nch == 1
        wl = (1 if single and (nob == 1 or t.order == "om") else nm) * L.groups
        xl = (1 if single and (nm == 1 or t.order == "mo") else nob) * L.groups
        wbytes = wl * L.opg * L.Cg * KK if not single else wl * nob * t.ob * t.jc * KK
        xbytes = xl * nm * t.nlen * min(t.jc, L.Cg) * _rows_needed(L, t.ohlen) * L.Wp
    steps = nm * nob * nch * L.groups
    mrows = t.nlen * t.ohlen * L.OW
    return [t.jc, t.ob, t.ohlen, t.nlen, float(t.order == "om"), nm, nob, nch, steps,
            math.log1p(wbytes), math.log1p(xbytes), mrows % 32, -(-mrows // 32), t.ob % 32,
            k / max(L.n_groups, 1)]


# ----------------------------------------------------------------------------------------- search
def _fit_predict(X_train, y_train, X_pred, seed: int) -> np.ndarray:
    """XGBoost (native API: no scikit-learn needed) fitted on measured candidates' log cycles;
    returns the predicted log cycles of the others (lower = ranked first)."""
    import xgboost as xgb

    params = {"max_depth": 4, "eta": 0.3, "objective": "reg:squarederror", "seed": int(seed) % (2 ** 31),
              "nthread": 1, "verbosity": 0}
    booster = xgb.train(params, xgb.DMatrix(X_train, label=y_train), num_boost_round=60)
    return booster.predict(xgb.DMatrix(X_pred))


def search_layer(L, cfg: NPUConfig, k: int, trials: int, seed: int, space: Optional[List[Tiling]] = None,
                 codes: Optional[dict] = None) -> dict:
    """The fastest mapping of L at count k among at most `trials` measured candidates (all of the
    space when it is that small, else the cost model's candidates + a random sample + rounds chosen
    by an XGBoost ranker). Returns {"tiling", "cycles", "default_cycles", "measured", "space",
    "ranked"}."""
    space = tuning_space(L, cfg) if space is None else space
    if not space:
        raise FlexiQError(f"npu tuning: layer {L.layer} ({L.name}) has no mapping that fits the SRAMs")
    codes = {} if codes is None else codes
    rng = np.random.default_rng(seed)
    measured: Dict[int, int] = {}

    def measure(i):
        t = space[i]
        if t not in codes:
            codes[t] = emit_variant(L, 0, t, None)
        measured[i] = int(estimate_cycles(L, cfg, codes[t], k))

    n_default = len(candidate_tilings(L, cfg))
    for i in range(n_default):
        measure(i)
    default_cycles = min(measured.values())
    budget = max(int(trials), n_default)
    ranked = False
    if len(space) <= budget:
        for i in range(n_default, len(space)):
            measure(i)
    else:
        rest = np.arange(n_default, len(space))
        n0 = min(len(rest), max(4, (budget - n_default) // 3))
        for i in rng.choice(rest, size=n0, replace=False):
            measure(int(i))
        X = np.asarray([features(L, t, k) for t in space], np.float64)
        batch = max(2, (budget - len(measured)) // 4)
        while len(measured) < budget:
            idx = np.fromiter(measured.keys(), int)
            y = np.log(np.fromiter(measured.values(), float))
            un = np.setdiff1d(np.arange(len(space)), idx)
            if not len(un):
                break
            pred = _fit_predict(X[idx], y, X[un], seed)
            ranked = True
            n_take = min(batch, budget - len(measured))
            order = un[np.argsort(pred, kind="stable")]
            take = [int(i) for i in order[:max(1, n_take - 1)]]
            if n_take > 1 and len(order) > len(take):
                take.append(int(rng.choice(order[len(take):])))     # exploration
            for i in take:
                measure(int(i))
    best = min(measured, key=lambda i: (measured[i], i))
    return {"tiling": space[best], "cycles": measured[best], "default_cycles": default_cycles,
            "measured": len(measured), "space": len(space), "ranked": ranked}


# ------------------------------------------------------------------------------------------ model
def npu_programs(model, plan, batch_size: int = 1, npu_config=None):
    """The NPU programs of `model` compiled with `plan` (as `fq.compile(..., target="npu")` lowers
    them: same partition, same program wiring and ABUF allocation), without building anything;
    returns (programs, config)."""
    import tvm
    from tvm import relax

    from ...passes.flexiq_rewrite import flexiq_rewrite
    from ...quant.schedule import STANDARD_LEVELS
    from . import _feasible_layers
    from .partition import partition

    cfg = NPUConfig.from_any(npu_config)
    mod = flexiq_rewrite(*model.at(batch_size), plan, batch_size)
    ok = _feasible_layers(mod, cfg)
    mod = partition(mod, offload=lambda i: ok.get(i, False))
    levels = [plan.counts_for_ratio(r) for r in STANDARD_LEVELS]
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    programs = [lower_function(str(f.attrs.get("global_symbol", gv.name_hint)), f, prims, cfg, levels)
                for gv, f in mod.functions_items()
                if isinstance(f, relax.Function) and f.attrs is not None and "Codegen" in f.attrs]
    return programs, cfg


def npu_layers(model, plan, batch_size: int = 1, npu_config=None):
    """The NPU layers of `model` compiled with `plan`, in layer order (see `npu_programs`)."""
    programs, cfg = npu_programs(model, plan, batch_size, npu_config)
    return sorted((L for P in programs for L in P.layers), key=lambda L: L.layer), cfg


def tune_npu(model, plan, *, db_dir, trials: int = DEFAULT_TRIALS, levels: Optional[Sequence[float]] = None,
             batch_size: int = 1, seed: int = 0, progress: bool = True, npu_config=None) -> dict:
    """Tune the NPU mapping of every NPU layer of `model` (a FloatModel) under `plan` at every
    ratio level in `levels` (default: the standard levels), measuring at most `trials` candidates
    per (layer, level); write the best per (geometry, level, configuration) to
    `<db_dir>/npu/records.json` (merged, atomic, after every layer: an interrupted run resumes,
    and keys already tuned with at least `trials` trials are skipped). Seeded: the same inputs
    give the same records.

    Returns {"db", "records_path", "tuned", "skipped", "levels": {level: {"default", "tuned"}},
    "layers": [...], "seconds"}: per level the sums of the layers' estimated cycles with the cost
    model's mapping and with the tuned one."""
    from tqdm.auto import tqdm

    from ...quant.schedule import STANDARD_LEVELS

    if db_dir is None:
        raise FlexiQError("tune_npu: db_dir is required (the records go to <db_dir>/npu/records.json)")
    if int(trials) < 1:
        raise FlexiQError(f"tune_npu: trials must be >= 1, got {trials}")
    levels = list(STANDARD_LEVELS) if levels is None else [float(r) for r in levels]
    for r in levels:
        if not 0.0 <= r <= 1.0:
            raise FlexiQError(f"tune_npu: level {r} is outside [0, 1]")
    t0 = time.perf_counter()
    layers, cfg = npu_layers(model, plan, batch_size, npu_config)
    if not layers:
        raise FlexiQError("tune_npu: no layer of this model runs on the NPU with this npu_config")
    counts = {r: plan.counts_for_ratio(r) for r in levels}
    have = load_records(db_dir)
    out = {"db": os.fspath(db_dir), "records_path": records_path(db_dir), "tuned": 0, "skipped": 0,
           "levels": {r: {"default": 0, "tuned": 0} for r in levels}, "layers": []}
    it = tqdm(layers, desc="npu tune", unit="layer", disable=not progress)
    for L in it:
        space = tuning_space(L, cfg)
        codes = {}
        new = {}
        by_k = {}                     # levels that share a count share the search (one mapping per count)
        for li, r in enumerate(levels):
            k = int(min(max(int(counts[r][L.layer]), 0), L.n_groups))
            key = record_key(L, cfg, r, k)
            rec = have.get(key)
            if rec is not None and int(rec.get("trials", 0)) >= int(trials):
                out["skipped"] += 1
                res = {"tiling": None, "cycles": int(rec["cycles"]), "default_cycles": int(rec["default_cycles"]),
                       "measured": 0, "space": int(rec.get("space", 0))}
            else:
                if k not in by_k:
                    by_k[k] = search_layer(L, cfg, k, trials, seed + 7919 * L.layer + k, space, codes)
                res = by_k[k]
                new[key] = {"tiling": tiling_to_dict(res["tiling"]), "cycles": res["cycles"],
                            "default_cycles": res["default_cycles"], "trials": int(trials),
                            "measured": res["measured"], "space": res["space"], "level": r, "k": k,
                            "layer": L.name, "model": getattr(model, "name", ""), "config": cfg.to_dict()}
                out["tuned"] += 1
            out["levels"][r]["default"] += res["default_cycles"]
            out["levels"][r]["tuned"] += res["cycles"]
            out["layers"].append({"layer": L.layer, "name": L.name, "level": r, "k": k, "key": key,
                                  "cycles": res["cycles"], "default_cycles": res["default_cycles"],
                                  "measured": res["measured"], "space": res["space"]})
        if new:
            save_records(db_dir, new)
            have.update(load_records(db_dir))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
