"""The NPU with default plans and vision-NPU mappings (issue 13).

* Plans made with the defaults (per-ratio bias rows from accuracy recovery) and plans with dynamic
  extraction give the llvm artifact's outputs bit for bit at every standard ratio and at random
  counts (the bias row and the live shifts are run-time state of the simulator, as on llvm).
* Depthwise convs run in the depthwise mapping (channels across columns) and the dual 4-bit MACs
  speed them up; the compiler's cost model equals the simulator on a one-layer program; one mapping
  is chosen per ratio level and K4 selects it; spills are reported; a ratio switch is a cached
  integer-tensor swap.
"""
import copy
import time
import warnings

import numpy as np
import pytest
import tvm
from tvm import relax

import flexiq_tvm as fq
from flexiq_tvm.quant import Plan
from flexiq_tvm.targets.npu import NPUConfig
from flexiq_tvm.targets.npu.codegen import candidate_tilings, emit_variant, estimate_cycles
from conftest import counts_grid

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _relu6(g):
    return g.node("Clip", [g.cur, g.const(np.float32(0.0), "lo"), g.const(np.float32(6.0), "hi")])


def _mobile_block_model(tmp_path, graph):
    """A MobileNetV2-like stack: stem conv + ReLU6, depthwise 3x3 + ReLU6, 1x1 projection, a residual
    block (expansion, depthwise, projection, add), expansion 1x1 + ReLU6, strided depthwise,
    projection, global pool, Gemm (every kind of layer)."""
    shape = (3, 12, 12)
    g = graph(shape, seed=11)
    g.conv(3, 32, 3, 1, 1); _relu6(g)
    g.conv(32, 32, 3, 1, 1, groups=32); _relu6(g)
    t0 = g.conv(32, 16, 1, 1, 0)
    g.conv(16, 32, 1, 1, 0); _relu6(g)                       # a residual block (add on the vector unit)
    g.conv(32, 32, 3, 1, 1, groups=32); _relu6(g)
    g.conv(32, 16, 1, 1, 0)
    g.node("Add", [t0, g.cur])
    g.conv(16, 48, 1, 1, 0); _relu6(g)
    g.conv(48, 48, 3, 2, 1, groups=48); _relu6(g)
    g.conv(48, 24, 1, 1, 0)
    g.gap(); g.flatten(); g.gemm(24, 10)
    model = fq.load_model(g.save(tmp_path / "mobile.onnx"))
    rng = np.random.default_rng(3)
    calib = rng.standard_normal((24,) + shape).astype(np.float32)
    x = rng.standard_normal((2,) + shape).astype(np.float32) * np.float32([[[[1.5]]], [[[0.3]]]])
    return model, calib, x


@pytest.fixture(scope="module")
def mobile(tmp_path_factory):
    from conftest import GraphBuilder

    return _mobile_block_model(tmp_path_factory.mktemp("mobile"), GraphBuilder)


@pytest.fixture(scope="module")
def mobile_plans(mobile):
    """The mobile block's range plans (group_size 8), with bias rows (the default, recover=True) and
    without, quantized once for the module; each test takes its own copy (`_plan`), so one test's
    changes (plan.dynamic = True) cannot reach another."""
    model, calib, _ = mobile
    return {rec: fq.quantize(model, calib, search="range", group_size=8, recover=rec, progress=False)
            for rec in (True, False)}


def _plan(mobile_plans, recover):
    return copy.deepcopy(mobile_plans[recover])


def _compare(model, plan, x, counts_extra=()):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)          # no "drops the corrections" warning
        npu = fq.compile(model, plan, target="npu", batch_size=x.shape[0])
    ref = fq.compile(model, plan, target="llvm", batch_size=x.shape[0])
    for r in LEVELS:
        npu.set_ratio(r)
        ref.set_ratio(r)
        a, b = npu(x), ref(x)
        assert np.array_equal(a, b), (r, float(np.abs(a - b).max()))
    for counts in counts_extra:
        npu.set_counts(counts)
        ref.set_counts(counts)
        assert np.array_equal(npu(x), ref(x)), counts.tolist()
    return npu


def test_default_plan_with_bias_rows_bit_exact(mobile, mobile_plans):
    model, calib, x = mobile
    plan = _plan(mobile_plans, recover=True)                                          # the default plan
    assert plan.bias_correction, "the default plan should carry per-ratio bias corrections"
    npu = _compare(model, plan, x, counts_grid(plan, seed=5)[3:])
    st = npu.npu_stats()
    assert {l["layer"] for l in st["layers"]} == set(range(plan.num_layers))      # all on the NPU
    # the bias rows really differ between levels (otherwise this test would prove nothing)
    npu.set_ratio(0.0)
    y0 = npu(x)
    npu.set_ratio(1.0)
    assert not np.array_equal(y0, npu(x))


def test_residual_add_and_relu6_stay_on_the_npu(mobile, mobile_plans):
    """ReLU6 (ONNX Clip -> maximum/minimum) fuses into its layer and the residual add and the
    global pool run on the vector unit, so the whole model is one NPU program with no host round trip."""
    model, calib, x = mobile
    plan = _plan(mobile_plans, recover=False)
    vm, tgt = _build(model, plan)
    progs = list(tgt.programs.values())
    assert sum(1 for P in progs for A in P.adds if not A.pool) == 1
    assert [A.pool for P in progs for A in P.adds if A.pool] == [36]      # the 6x6 global pool
    big = max(progs, key=lambda P: len(P.layers))
    assert len(big.layers) == plan.num_layers              # all convs and the Gemm after the pool
    assert [L.act_hi for L in big.layers if L.relu][:1] == [6.0]
    assert big.adds[0].onchip == [True, True]


def test_dynamic_extraction_bit_exact(mobile, mobile_plans):
    model, calib, x = mobile
    plan = _plan(mobile_plans, recover=True)
    plan.dynamic = True
    plan = Plan.loads(plan.dumps())
    _compare(model, plan, x, counts_grid(plan, seed=6)[3:])


def test_dynamic_tokens_dense_bit_exact(tmp_path, graph):
    """Dense layers over tokens: the live maxima are per sample (over its tokens), not per row."""
    shape = (6, 16)
    g = graph(shape, seed=4)
    g.matmul(16, 24); g.relu(); g.matmul(24, 8)
    model = fq.load_model(g.save(tmp_path / "tok.onnx", out_rank=3))
    rng = np.random.default_rng(0)
    plan = fq.quantize(model, rng.standard_normal((16,) + shape).astype(np.float32), search="range",
                       group_size=4, progress=False)
    plan.dynamic = True
    x = rng.standard_normal((3,) + shape).astype(np.float32) * np.float32([[[3.0]], [[0.05]], [[0.6]]])
    _compare(model, plan, x, counts_grid(plan, seed=7)[3:])


# ---------------------------------------------------------------- depthwise mapping, cost model
def _one_layer(tmp_path, graph, cin, cout, hw, k, groups, group_size=16):
    g = graph((cin, hw, hw), seed=9)
    g.conv(cin, cout, k, 1, k // 2, groups=groups)
    model = fq.load_model(g.save(tmp_path / f"one_{cin}_{cout}_{groups}.onnx"))
    calib = np.random.default_rng(0).standard_normal((8, cin, hw, hw)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=group_size, search="range", recover=False, progress=False)
    return model, plan, calib[:1]


def _build(model, plan, cfg=None):
    """The NPU target's build of `plan` (with the manifest, as fq.compile does) plus its programs."""
    from flexiq_tvm.api import _with_manifest
    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
    from flexiq_tvm.targets import get_target

    mod = flexiq_rewrite(model.mod, model.layers, plan, 1)
    tgt = get_target("npu", npu_config=cfg)
    ex = tgt.build(_with_manifest(mod, {"plan": plan.dumps()}))
    return relax.VirtualMachine(ex, tvm.cpu()), tgt


def _sim(vm, x, counts):
    vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.asarray(counts, np.int32)))
    from flexiq_tvm.targets.npu.stats import decode

    return decode(vm["flexiq_npu_stats_get"]().numpy())["layers"][0]


def test_depthwise_mapping_and_dual_4bit(tmp_path, graph):
    model, plan, x = _one_layer(tmp_path, graph, 96, 96, 28, 3, 96)
    vm, tgt = _build(model, plan)
    (P,) = tgt.programs.values()
    assert P.layers[0].depthwise
    n = plan.layers[0].n_groups
    s0, s1 = _sim(vm, x, [0]), _sim(vm, x, [n])
    # channels across the 32 columns: far above the 1/32 of one conv group per tile
    assert s0["compute_utilization"] > 0.2, s0
    # a 3x3 depthwise takes ceil(9 / 2) = 5 cycles per pass in 4-bit instead of 9
    assert s1["compute"] < 0.62 * s0["compute"], (s0, s1)
    assert s1["total"] < s0["total"]
    assert s1["macs4"] == s0["macs8"] == 96 * 28 * 28 * 9


@pytest.mark.parametrize("cin,cout,k,groups,cfg", [
    (32, 64, 3, 1, None),
    (96, 96, 3, 96, None),
    (48, 96, 1, 1, {"wbuf_kb": 4, "ibuf_kb": 8, "obuf_kb": 8, "rows": 16, "cols": 16}),
])
def test_cost_model_matches_simulator(tmp_path, graph, cin, cout, k, groups, cfg):
    """On a one-layer program (no neighbour to prefetch for or from) the compiler's estimate of the
    chosen mapping equals the simulated cycles, at every level and a random count; and the chosen
    mapping is the cheapest candidate at each level's count."""
    model, plan, x = _one_layer(tmp_path, graph, cin, cout, 10, k, groups, group_size=8)
    vm, tgt = _build(model, plan, cfg)
    (P,) = tgt.programs.values()
    L, variants, sel = P.layers[0], P.tilings[0], P.sel[0]
    c = NPUConfig.from_any(cfg)
    cands = candidate_tilings(L, c)
    ks = sorted({int(plan.counts_for_ratio(r)[0]) for r in LEVELS} | {int(np.random.default_rng(1).integers(0, L.n_groups + 1))})
    for k4 in ks:
        t = variants[sel[k4]]
        est = estimate_cycles(L, c, emit_variant(L, 0, t, None), k4)
        assert _sim(vm, x, [k4])["total"] == est, (k4, t)
        if k4 in {int(plan.counts_for_ratio(r)[0]) for r in LEVELS}:
            assert est <= min(estimate_cycles(L, c, emit_variant(L, 0, u, None), k4) for u in cands)


def test_spills_reported_and_still_exact(mobile, mobile_plans):
    model, calib, x = mobile
    plan = _plan(mobile_plans, recover=False)
    cfg = {"abuf_bytes": 0, "wbuf_bytes": 2048}
    npu = fq.compile(model, plan, target="npu", batch_size=2, npu_config=cfg)
    ref = fq.compile(model, plan, target="llvm", batch_size=2)
    for r in (0.0, 0.5, 1.0):
        npu.set_ratio(r)
        ref.set_ratio(r)
        assert np.array_equal(npu(x), ref(x)), r
    st = npu.npu_stats()
    assert all(l["spill"] for l in st["layers"])             # no ABUF: every input comes from DRAM
    assert not any(l["onchip_in"] for l in st["layers"])
    npu2 = fq.compile(model, plan, target="npu", batch_size=2)
    npu2.set_ratio(1.0)
    npu2(x)
    st2 = npu2.npu_stats()
    assert not any(l["spill"] for l in st2["layers"])         # the default 2 MiB holds this model
    assert st2["total_cycles"] < st["total_cycles"]
    assert sum(l["dram_bytes"] for l in st2["layers"]) < sum(l["dram_bytes"] for l in st["layers"])


def test_every_layer_gains_and_ratio_switch_is_integer_writes(mobile, mobile_plans):
    model, calib, x = mobile
    plan = _plan(mobile_plans, recover=True)
    npu = fq.compile(model, plan, target="npu", batch_size=1)
    tot = {}
    for r in (0.0, 1.0):
        npu.set_ratio(r)
        npu(x[:1])
        tot[r] = {l["layer"]: l for l in npu.npu_stats()["layers"]}
    for i, l0 in tot[0.0].items():
        l1 = tot[1.0][i]
        assert l1["compute"] < l0["compute"], (i, l0, l1)    # every layer kind's array time drops
    assert sum(l["total"] for l in tot[1.0].values()) < sum(l["total"] for l in tot[0.0].values())
    for r in LEVELS:
        npu.set_ratio(r)                                     # fill the per-ratio cache
    t0 = time.perf_counter()
    for i in range(1000):
        npu.set_ratio(LEVELS[i % 5])
    per = (time.perf_counter() - t0) / 1000
    assert per < 50e-6, per


def test_add_relu_block_on_the_npu_bit_exact(tmp_path, graph):
    """relu(a + f(a)) (the issue's small third-party CNN: 3x3 conv, 24-channel depthwise, 1x1, residual,
    pool, Gemm): the add and its ReLU run on the vector unit; default plan, every level, random counts."""
    shape = (3, 16, 16)
    g = graph(shape, seed=21)
    a = g.conv(3, 24, 3, 1, 1)
    a = g.relu()
    g.conv(24, 24, 3, 1, 1, groups=24); g.relu()
    g.conv(24, 24, 1, 1, 0)
    g.node("Add", [a, g.cur]); g.relu()
    g.gap(); g.flatten(); g.gemm(24, 10)
    model = fq.load_model(g.save(tmp_path / "small.onnx"))
    rng = np.random.default_rng(5)
    calib = rng.standard_normal((16,) + shape).astype(np.float32)
    plan = fq.quantize(model, calib, search="range", group_size=8, progress=False)
    x = rng.standard_normal((2,) + shape).astype(np.float32)
    _compare(model, plan, x, counts_grid(plan, seed=8)[3:])
    _, tgt = _build(model, plan)
    adds = [A for P in tgt.programs.values() for A in P.adds if not A.pool]
    assert len(adds) == 1 and adds[0].act and adds[0].act_lo == 0.0


# ---------------------------------------------------------------- global average pool (vector unit)
def test_global_pool_on_the_vector_unit(tmp_path, graph):
    """conv -> global average pool -> flatten -> Gemm runs as ONE NPU program (the pool reads the
    conv's float copy from the ABUF and writes the Gemm's INT8 input), bit for bit as the llvm
    artifact at every level; the pooled values equal an independent numpy mean (float32 sum over
    the positions in order, then / count) of the conv's tapped output; the pool's DRAM traffic is
    gone (no float32 feature map leaves the NPU)."""
    from flexiq_tvm.api import _with_manifest
    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
    from flexiq_tvm.targets import get_target
    from flexiq_tvm.targets.npu.partition import partition

    def build(with_gemm):
        g = graph((16, 9, 9), seed=2)
        g.conv(16, 40, 3, 1, 1); g.relu()
        g.gap(); g.flatten()
        if with_gemm:
            g.gemm(40, 10)
        return fq.load_model(g.save(tmp_path / f"gap{int(with_gemm)}.onnx"))

    rng = np.random.default_rng(4)
    calib = rng.standard_normal((16, 16, 9, 9)).astype(np.float32)
    x = calib[:2] * np.float32(1.7)
    model = build(True)
    plan = fq.quantize(model, calib, search="range", group_size=8, recover=False, progress=False)
    mod = _with_manifest(flexiq_rewrite(*model.at(2), plan, 2), {"plan": plan.dumps()})
    tgt = get_target("npu")
    tgt.lower(mod)
    (P,) = tgt.programs.values()
    assert len(P.layers) == 2 and [A.pool for A in P.adds] == [81]
    assert P.adds[0].onchip[0] and P.layers[1].in_onchip
    host = partition(mod, pool_on_npu=False)
    assert "R.mean" in host["main"].script() and "R.mean" not in partition(mod)["main"].script()
    _compare(model, plan, x)
    # independent reference: the pool over the conv's output, tapped from the llvm build
    model0 = build(False)
    plan0 = fq.quantize(model0, calib, search="range", group_size=8, recover=False, progress=False)
    npu = fq.compile(model0, plan0, target="npu", batch_size=2)
    from flexiq_tvm.api import compile_with_taps

    taps = compile_with_taps(model0, plan0, batch_size=2)
    for r in LEVELS:
        npu.set_ratio(r)
        counts = np.asarray(plan0.counts_for_ratio(r), np.int32)
        y0 = taps["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(counts))[2].numpy()
        y0 = np.maximum(y0, np.float32(0)).reshape(2, 40, 81)
        acc = np.zeros((2, 40), np.float32)
        for j in range(81):
            acc = (acc + y0[:, :, j]).astype(np.float32)
        assert np.array_equal(npu(x), acc / np.float32(81)), r
    st = npu.npu_stats()["layers"][0]
    # the program's only DRAM output is the pooled float32 result (2 x 40 x 4 B), not the feature map
    assert st["dram_bytes"] < 2 * 40 * 81 * 4, st
