"""NPU mapping tuning (issue 12): `targets/npu/tune.tune_npu`, its records and their use by the build.

* The tuning space is legal (every tile fits its SRAM bank) and contains the cost model's candidates.
* The search measures what it says (all of a small space; `trials` candidates with the XGBoost
  ranker otherwise), never records a mapping slower than the cost model's, is seeded, resumes,
  and shares records between layers of one geometry.
* A build with the records runs the recorded mapping at each level's count (K4 selects it), gives
  the llvm artifact's outputs bit for bit at every level and at random counts, and the simulator's
  cycles of a tuned one-layer program equal the tuner's measurement cycle for cycle.
* Missing, foreign or illegal records fall back to the cost model with one warning naming the
  layers; a corrupt records file is an error naming the file.
"""
import json
import os
import warnings

import numpy as np
import pytest
import tvm
from tvm import relax

import flexiq_tvm as fq
from flexiq_tvm.errors import FlexiQError
from flexiq_tvm.quant.schedule import STANDARD_LEVELS
from flexiq_tvm.targets.npu import NPUConfig
from flexiq_tvm.targets.npu.codegen import candidate_tilings, emit_variant, estimate_cycles
from flexiq_tvm.targets.npu.records import (load_records, record_key, records_path, save_records, tiling_fits,
                                            tiling_to_dict)
from flexiq_tvm.targets.npu.tune import npu_layers, search_layer, tune_npu, tuning_space
from conftest import GraphBuilder, counts_grid
from test_npu_flex import _mobile_block_model

SMALL = {"wbuf_kb": 4, "ibuf_kb": 8, "obuf_kb": 8, "rows": 16, "cols": 16}


@pytest.fixture(scope="module")
def mobile(tmp_path_factory):
    model, calib, x = _mobile_block_model(tmp_path_factory.mktemp("tune_mobile"), GraphBuilder)
    plan = fq.quantize(model, calib, search="range", group_size=8, progress=False)   # with bias rows
    return model, plan, x


def _lowered_programs(model, plan, batch, db=None, cfg=None):
    """The NPU programs of fq.compile's build (rewrite + manifest + partition + codegen), without
    compiling C: what the build would run."""
    from flexiq_tvm.api import _with_manifest
    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
    from flexiq_tvm.targets import get_target

    mod = flexiq_rewrite(*model.at(batch), plan, batch)
    tgt = get_target("npu", npu_config=cfg)
    tgt.lower(_with_manifest(mod, {"plan": plan.dumps()}), db)
    return tgt


@pytest.mark.parametrize("cfg", [None, SMALL])
def test_tuning_space_is_legal_and_contains_the_cost_models_candidates(mobile, cfg):
    model, plan, _ = mobile
    layers, c = npu_layers(model, plan, batch_size=2, npu_config=cfg)
    assert len(layers) == plan.num_layers
    bigger = 0
    for L in layers:
        space, cands = tuning_space(L, c), candidate_tilings(L, c)
        assert space[:len(cands)] == cands
        assert len(set(space)) == len(space)
        for t in space:
            assert tiling_fits(L, c, t) == "", (L.name, t)
        bigger += len(space) > len(cands)
    assert bigger >= len(layers) // 2
    # an illegal mapping is named with its reason
    L = layers[0]
    t = candidate_tilings(L, c)[0]
    assert "does not tile" in tiling_fits(L, c, t.__class__(jc=t.jc, ob=t.ob, ohlen=L.OH, nlen=L.N * 10 ** 6))
    assert "WBUF bank" in tiling_fits(L, NPUConfig.from_any({"wbuf_bytes": 64}), t)


def test_search_ranker_seeded_and_never_worse(tmp_path):
    g = GraphBuilder((48, 20, 20), seed=5)
    g.conv(48, 96, 3, 1, 1)
    model = fq.load_model(g.save(tmp_path / "one.onnx"))
    calib = np.random.default_rng(0).standard_normal((4, 48, 20, 20)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=False, progress=False)
    (L,), cfg = npu_layers(model, plan, 1, SMALL)
    space = tuning_space(L, cfg)
    k = int(plan.counts_for_ratio(0.5)[0])
    assert len(space) > 20
    full = search_layer(L, cfg, k, len(space), seed=0)
    assert full["measured"] == len(space) and not full["ranked"]
    truth = [estimate_cycles(L, cfg, emit_variant(L, 0, t, None), k) for t in space]
    assert full["cycles"] == min(truth)
    assert full["default_cycles"] == min(truth[:len(candidate_tilings(L, cfg))])
    a = search_layer(L, cfg, k, 14, seed=3)
    b = search_layer(L, cfg, k, 14, seed=3)
    assert a == b and a["ranked"] and a["measured"] == 14
    assert a["cycles"] <= a["default_cycles"]
    assert a["cycles"] == truth[space.index(a["tiling"])]
    # the ranker's picks beat random picks of the same budget on this layer (seeded, 5 seeds each)
    rng = np.random.default_rng(0)
    nd = len(candidate_tilings(L, cfg))
    rand = [min(truth[:nd] + [truth[i] for i in rng.choice(np.arange(nd, len(space)), 14 - nd, replace=False)])
            for _ in range(5)]
    ranked = [search_layer(L, cfg, k, 14, seed=s)["cycles"] for s in range(5)]
    assert np.mean(ranked) <= np.mean(rand)


def test_tuned_build_runs_the_records_bit_exact(mobile, tmp_path):
    model, plan, x = mobile
    res = tune_npu(model, plan, db_dir=tmp_path, trials=10, batch_size=2, progress=False)
    path = records_path(tmp_path)
    assert res["records_path"] == path and os.path.exists(path)
    data = json.load(open(path))
    assert data["version"] == 1 and len(data["records"]) == res["tuned"]
    assert res["tuned"] + res["skipped"] == len(STANDARD_LEVELS) * plan.num_layers
    recs = data["records"]
    assert all(r["cycles"] <= r["default_cycles"] for r in recs.values())
    assert any(r["cycles"] < r["default_cycles"] for r in recs.values())
    for r in STANDARD_LEVELS:
        assert res["levels"][r]["tuned"] <= res["levels"][r]["default"]
    # the build runs the recorded mapping at each level's count
    tgt = _lowered_programs(model, plan, 2, str(tmp_path))
    assert tgt.untuned == []
    cfg = NPUConfig()
    seen = 0
    for P in tgt.programs.values():
        for L, variants, sel in zip(P.layers, P.tilings, P.sel):
            for r in STANDARD_LEVELS:
                k = int(min(plan.counts_for_ratio(r)[L.layer], L.n_groups))
                rec = recs[record_key(L, cfg, r, k)]
                # levels with the same count share one search, so one mapping
                same_k = [recs[record_key(L, cfg, q, k)] for q in STANDARD_LEVELS
                          if int(min(plan.counts_for_ratio(q)[L.layer], L.n_groups)) == k]
                assert all(o == rec["tiling"] for o in (x["tiling"] for x in same_k)), (L.name, r)
                assert tiling_to_dict(variants[sel[k]]) == rec["tiling"], (L.name, r)
                seen += 1
    assert seen == len(STANDARD_LEVELS) * plan.num_layers
    # outputs: bit for bit those of the llvm artifact (bias rows, every level, random counts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        npu = fq.compile(model, plan, target="npu", batch_size=2, tuning_db=str(tmp_path))
    ref = fq.compile(model, plan, target="llvm", batch_size=2)
    for r in STANDARD_LEVELS:
        npu.set_ratio(r)
        ref.set_ratio(r)
        assert np.array_equal(npu(x), ref(x)), r
    for counts in counts_grid(plan, seed=2)[3:]:
        npu.set_counts(counts)
        ref.set_counts(counts)
        assert np.array_equal(npu(x), ref(x)), counts.tolist()


def test_resume_reproducible_and_shared(mobile, tmp_path):
    model, plan, _ = mobile
    a, b = tmp_path / "a", tmp_path / "b"
    r1 = tune_npu(model, plan, db_dir=a, trials=8, batch_size=2, progress=False, seed=1)
    text = open(records_path(a)).read()
    r2 = tune_npu(model, plan, db_dir=a, trials=8, batch_size=2, progress=False, seed=1)
    assert r2["tuned"] == 0 and r2["skipped"] == r1["tuned"] + r1["skipped"]
    assert open(records_path(a)).read() == text                     # nothing rewritten
    assert r2["levels"] == r1["levels"]
    tune_npu(model, plan, db_dir=b, trials=8, batch_size=2, progress=False, seed=1)
    assert load_records(b) == load_records(a)                       # seeded
    # more trials re-tune; the merged file keeps the faster mapping per key
    r3 = tune_npu(model, plan, db_dir=a, trials=16, batch_size=2, progress=False, seed=1, levels=[0.5])
    assert r3["tuned"] > 0
    old, new = json.loads(text)["records"], load_records(a)
    for key, rec in new.items():
        assert rec["cycles"] <= old[key]["cycles"]
        if " level 0.5 " in key:
            assert rec["trials"] == 16
    # one file serves another configuration's records too (keys carry the configuration)
    tune_npu(model, plan, db_dir=a, trials=4, batch_size=2, progress=False, npu_config=SMALL, levels=[1.0])
    assert len(load_records(a)) > len(new)


def test_missing_foreign_or_bad_records(mobile, tmp_path):
    model, plan, _ = mobile
    tune_npu(model, plan, db_dir=tmp_path, trials=4, batch_size=2, progress=False, npu_config=SMALL)
    with pytest.warns(UserWarning, match=rf"no tuning record in .*records.json for {plan.num_layers} layer\(s\)"
                                         r".*layer0: 0, 0.25, 0.5, 0.75, 1; layer1: 0, "):
        tgt = _lowered_programs(model, plan, 2, str(tmp_path))             # records of another config
    assert len(tgt.untuned) == len(STANDARD_LEVELS) * plan.num_layers
    # an illegal record for this configuration is named and not used
    layers, cfg = npu_layers(model, plan, 2)
    L = layers[0]
    k = int(plan.counts_for_ratio(0.5)[0])
    t = candidate_tilings(L, cfg)[0]
    save_records(tmp_path, {record_key(L, cfg, 0.5, k): {
        "tiling": {"jc": t.jc, "ob": t.ob, "ohlen": L.OH, "nlen": 10 ** 6, "order": "mo"},
        "cycles": 1, "default_cycles": 2, "trials": 1}})
    with pytest.warns(UserWarning, match=r"layer0: 0, 0.25, 0.5 \(recorded mapping .* is illegal here \(m-block"):
        _lowered_programs(model, plan, 2, str(tmp_path))
    with open(records_path(tmp_path), "w") as f:
        f.write("{not json")
    with pytest.raises(FlexiQError, match="records.json: unreadable"):
        _lowered_programs(model, plan, 2, str(tmp_path))
    with pytest.raises(FlexiQError, match="db_dir is required"):
        tune_npu(model, plan, db_dir=None)


def test_tuned_one_layer_program_cycles_equal_the_measurement(tmp_path):
    """The tuner measures with the simulator's scoreboard; on a one-layer program the C simulator
    gives the same cycles for the tuned mapping (not the cost model's) at every level."""
    from flexiq_tvm.api import _with_manifest
    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
    from flexiq_tvm.targets import get_target
    from flexiq_tvm.targets.npu.stats import decode

    g = GraphBuilder((48, 20, 20), seed=5)
    g.conv(48, 96, 3, 1, 1)
    model = fq.load_model(g.save(tmp_path / "one.onnx"))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((4, 48, 20, 20)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=False, progress=False)
    res = tune_npu(model, plan, db_dir=tmp_path / "db", trials=30, npu_config=SMALL, progress=False)
    assert any(l["cycles"] < l["default_cycles"] for l in res["layers"])
    mod = flexiq_rewrite(model.mod, model.layers, plan, 1)
    tgt = get_target("npu", npu_config=SMALL)
    vm = relax.VirtualMachine(tgt.build(_with_manifest(mod, {"plan": plan.dumps()}), str(tmp_path / "db")), tvm.cpu())
    ref = fq.compile(model, plan, target="llvm", batch_size=1)
    x = calib[:1]
    for rec in res["layers"]:
        counts = np.asarray([rec["k"]], np.int32)
        y = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(counts)).numpy()
        st = decode(vm["flexiq_npu_stats_get"]().numpy())["layers"][0]
        assert st["total"] == rec["cycles"], rec
        ref.set_counts(counts)
        assert np.array_equal(y, ref(x)), rec["level"]
