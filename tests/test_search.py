"""Channel selection: nesting, MAC accounting, determinism, and that the searches earn their keep."""
import copy

import numpy as np
import pytest

import flexiq_tvm as fq
from flexiq_tvm.api import compile_with_taps
from flexiq_tvm.quant.reference import LayerReference
from flexiq_tvm.quant.search import schedule_from_levels, sensitivity_schedule


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from conftest import GraphBuilder
    g = GraphBuilder((4, 10, 10), seed=31)
    g.conv(4, 24, 3, 1, 1)
    g.relu()
    g.conv(24, 24, 3, 2, 1, groups=24)
    g.relu()
    g.conv(24, 32, 1, 1, 0)
    g.relu()
    g.gap()
    g.flatten()
    g.gemm(32, 6)
    path = g.save(tmp_path_factory.mktemp("s") / "s.onnx")
    model = fq.load_model(path)
    calib = np.random.default_rng(0).standard_normal((64, 4, 10, 10)).astype(np.float32)
    return model, calib


@pytest.fixture(scope="module")
def searched(small_model):
    """search -> the small model's plan for it (group_size 8, 32 search samples, 6 generations, no bias
    correction), quantized once per module: test_levels_nested_and_mac_share[evolutionary] and
    test_evolutionary_plan_reorders_groups_and_stays_bit_exact check the same plan. Read-only."""
    model, calib = small_model
    cache = {}

    def get(search):
        if search not in cache:
            cache[search] = fq.quantize(model, calib, group_size=8, search=search, search_samples=32,
                                        generations=6, recover=False, progress=False)
        return cache[search]
    return get


def _level_counts(plan):
    return {r: plan.counts_for_prefix(p) for r, p in sorted(plan.levels.items())}


@pytest.mark.parametrize("search", ["range", "sensitivity", "greedy", "evolutionary"])
def test_levels_nested_and_mac_share(searched, search):
    plan = searched(search)
    counts = _level_counts(plan)
    assert counts[0.0].sum() == 0
    assert counts[1.0].tolist() == [l.n_groups for l in plan.layers]
    ordered = list(counts.values())
    for a, b in zip(ordered, ordered[1:]):
        assert np.all(a <= b), (a, b)           # nesting: each level's low groups contain the previous
    max_group = max(l.group_macs.max() for l in plan.layers) / sum(l.group_macs.sum() for l in plan.layers)
    for r, c in counts.items():
        assert abs(plan.mac_ratio(c) - r) <= max_group + 1e-9
        macs = sum(int(l.group_macs[:k].sum()) for l, k in zip(plan.layers, c))
        assert plan.mac_ratio(c) == macs / sum(l.macs_per_channel * l.in_channels for l in plan.layers)
    assert plan.meta["search"] == search


@pytest.mark.parametrize("search", ["greedy", "evolutionary"])
def test_same_seed_same_plan_byte_for_byte(small_model, search):
    model, calib = small_model
    kw = dict(group_size=8, search=search, search_samples=32, generations=6, seed=3, progress=False)
    a, b = fq.quantize(model, calib, **kw), fq.quantize(model, calib, **kw)
    assert a.dumps() == b.dumps()
    assert a.timings["quantize"] > 0 and "timings" not in a.dumps()


def test_evolutionary_plan_reorders_groups_and_stays_bit_exact(small_model, searched):
    model, calib = small_model
    plan = searched("evolutionary")
    vm = compile_with_taps(model, plan, batch_size=2)
    import tvm
    refs = [LayerReference(s, p) for s, p in zip(model.specs, plan.layers)]
    for r in (0.25, 0.5, 0.75):
        counts = plan.counts_for_ratio(r)
        outs = vm["main"](tvm.runtime.tensor(calib[:2]), tvm.runtime.tensor(counts))
        for i, ref in enumerate(refs):
            assert np.array_equal(outs[2 + 2 * i].numpy(), ref.forward(outs[1 + 2 * i].numpy(), counts[i]))


def test_evolutionary_no_worse_than_its_seeds(demo_paths):
    """At 0.75 the evolved sets score no worse (output distance from INT8) than range ranking's."""
    from flexiq_tvm.calibrate.data import load_data
    from flexiq_tvm.search.fitness import OutputDistance
    from flexiq_tvm.quant.search import sets_from_schedule
    from flexiq_tvm.search.driver import run_search

    model = fq.load_model(demo_paths["model"])
    x, _ = load_data(demo_paths["calib"], model)
    common = dict(group_size=8, search_samples=64, seed=0, recover=False, progress=False)
    rng_plan = fq.quantize(model, x, search="range", **common)
    # fq.quantize(model, x, search="evolutionary", generations=8, **common) is this very plan: the same
    # calibration and range plan (its seed), then the evolutionary search (recover=False: nothing after
    # it). Searching a copy of the range plan spares a second calibration of 512 images.
    evo_plan = copy.deepcopy(rng_plan)
    run_search(model, evo_plan, x, "evolutionary", seed=0, samples=64, generations=8, progress=False)
    assert evo_plan.meta["search"] == "evolutionary" and evo_plan.meta["search_generations"] == 8
    pick = np.sort(np.random.default_rng(0).choice(x.shape[0], size=256, replace=False))
    fit = OutputDistance(model, rng_plan, x[pick])
    r_sets = sets_from_schedule(rng_plan.schedule, rng_plan.levels[0.75], rng_plan.num_layers)
    # express the evolved 0.75 set in the range plan's group ids
    e_sets = []
    for lr, le, k in zip(rng_plan.layers, evo_plan.layers, evo_plan.counts_for_ratio(0.75)):
        ids = {int(lr.rank[c]) for g in range(k) for c in le.group_channels(g)}
        e_sets.append(frozenset(ids))
    share = lambda s: rng_plan.mac_ratio([len(v) for v in s])  # noqa: E731  (sizes equal within layers)
    assert abs(share(e_sets) - share(r_sets)) < 0.1
    assert fit.low_sets(e_sets) <= fit.low_sets(r_sets)


def test_schedule_helpers():
    curves = [np.array([0, 1.0, 1.1, 5.0]), np.array([0, 0.2, 0.4])]
    macs = [np.array([10, 10, 10]), np.array([10, 10])]
    sch = sensitivity_schedule(curves, macs)
    assert sorted(sch) == [0, 0, 0, 1, 1] and sch[:2] == [1, 1]
    sets = [[frozenset(), frozenset({1})], [frozenset({2}), frozenset({0, 1})]]
    perms, schedule, prefixes = schedule_from_levels(sets, [3, 2])
    assert perms == [[2, 0, 1], [1, 0]] and prefixes == [1, 3] and len(schedule) == 5
    with pytest.raises(ValueError, match="nested"):
        schedule_from_levels([[frozenset({1}), frozenset()], [frozenset({2}), frozenset()]], [3, 2])


def test_default_search_samples_follow_model_size(small_model):
    from flexiq_tvm.quant import LayerSpec
    from flexiq_tvm.search.driver import default_search_samples

    model, calib = small_model
    assert default_search_samples(model.specs) == 512                     # small model: the cap
    big = LayerSpec("pw", "conv2d", np.zeros((96, 64, 1, 1), np.float32), None, (64, 56, 56), (96, 56, 56))
    assert 16 < 5e9 // big.macs < 512
    assert default_search_samples([big]) == int(5e9 // big.macs)          # about 5 GMAC per candidate
    assert default_search_samples([big] * 40) == 16                       # MobileNetV2-sized: the floor
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=False, progress=False)
    assert plan.meta["search_samples"] == min(512, calib.shape[0])
    with pytest.raises(ValueError, match="search_samples"):
        fq.quantize(model, calib, search_samples=0, progress=False)
