"""The ViT's transformer stack on the NPU (issue 13; docs/npu.md sections 4.3 and 4.4).

Layer norm, softmax, the erf GELU, residual adds, the float32 attention matmuls (Q K^T, A V) and
the reshapes / transposes / slices between the dense layers run on the NPU's vector unit, so the
whole shipped ViT is one NPU function. The simulator reproduces the host kernels' float32
arithmetic, so the default plan (bias rows on) must stay bit-exact with the llvm artifact at every
standard ratio and at random per-layer counts (also with dynamic extraction, and on a small token
graph with odd sizes: 7-token softmax rows, a 48-wide layer norm, batch 3). The weights (133 KB)
fit the WBUF: they are loaded once, at program load, and reported apart from the per-inference
cycles; with `resident_weights=0` or a small WBUF they load per inference as before.
"""
import os

import numpy as np
import pytest
from tvm import relax

import flexiq_tvm as fq
from flexiq_tvm.calibrate.data import load_data
from conftest import counts_grid

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flexiq_tvm", "assets")
LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def vit():
    """The shipped ViT with a default plan (bias rows on; range search keeps it quick): the tests
    compare the NPU with llvm for that plan, so any valid plan serves."""
    model = fq.load_model(os.path.join(ASSETS, "fashion_vit.onnx"))
    calib, _ = load_data(os.path.join(ASSETS, "fashion_calib.npz"), model)
    plan = fq.quantize(model, calib[:16], search="range", progress=False)      # recover=True (default)
    assert plan.bias_correction
    x, _ = load_data(os.path.join(ASSETS, "fashion_test.npz"), model)
    return model, plan, x[:4]


@pytest.fixture(scope="module")
def vit_ref(vit):
    model, plan, _ = vit
    return fq.compile(model, plan, target="llvm", batch_size=2)


@pytest.fixture(scope="module")
def vit_npu(vit):
    model, plan, _ = vit
    return fq.compile(model, plan, target="npu", batch_size=2)


def test_whole_transformer_is_one_npu_function(vit):
    """After partitioning, `main` is one call of one NPU function: no host operator is left between
    the dense layers (attention, layer norms, GELUs, adds and reshapes all run on the NPU)."""
    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
    from flexiq_tvm.targets import get_target

    model, plan, _ = vit
    mod = flexiq_rewrite(model.mod, model.layers, plan, 1)
    part = get_target("npu").partition(mod)
    ext = [gv for gv, f in part.functions_items()
           if isinstance(f, relax.Function) and f.attrs is not None and "Codegen" in f.attrs]
    assert len(ext) == 1
    bindings = [b for blk in part["main"].body.blocks for b in blk.bindings]
    assert len(bindings) == 1 and bindings[0].value.op.same_as(ext[0])


def test_vit_bit_exact_with_llvm_at_every_level_and_random_counts(vit, vit_npu, vit_ref):
    model, plan, x = vit
    ref = vit_ref
    for r in LEVELS:
        vit_npu.set_ratio(r)
        ref.set_ratio(r)
        for s in range(0, x.shape[0], 2):
            a, b = vit_npu(x[s:s + 2]), ref(x[s:s + 2])
            assert np.array_equal(a, b), (r, float(np.abs(a - b).max()))
    for counts in counts_grid(plan, seed=7)[3:]:
        vit_npu.set_counts(counts)
        ref.set_counts(counts)
        assert np.array_equal(vit_npu(x[:2]), ref(x[:2])), counts.tolist()
    # the levels really differ (otherwise exactness would prove little)
    vit_npu.set_ratio(0.0)
    y0 = vit_npu(x[:2])
    vit_npu.set_ratio(1.0)
    assert not np.array_equal(y0, vit_npu(x[:2]))


def test_vit_gains_from_4bit_and_weights_stay_resident(vit, vit_npu):
    _, plan, x = vit
    vit_npu(x[:2])                                           # the first call loads the weights
    cyc = {}
    for r in LEVELS:
        vit_npu.set_ratio(r)
        vit_npu(x[:2])
        st = vit_npu.npu_stats()
        cyc[r] = st["total_cycles"]
        assert st["weights_resident"] and st["weight_load_cycles"] > 0
        assert not st["weights_loaded_this_call"]            # loaded once, by the first call
        assert {l["layer"] for l in st["layers"]} == set(range(plan.num_layers))
        if r == 0.0:
            l0 = st["layers"]
        if r == 1.0:
            l1 = st["layers"]
    assert all(cyc[a] > cyc[b] for a, b in zip(LEVELS, LEVELS[1:])), cyc
    assert (cyc[0.0] - cyc[0.5]) / (cyc[0.0] - cyc[1.0]) >= 0.45, cyc
    assert all(b["total"] < a["total"] for a, b in zip(l0, l1))    # every dense layer gains
    # weights are not re-read per inference: only operator traffic is DMA (no host float in/out
    # between the layers: the first layer reads the image, the last writes the logits)
    assert sum(l["dram_bytes"] for l in l1) < 20_000


def test_weights_loaded_per_call_when_not_resident(vit, vit_ref):
    """resident_weights=0, or a WBUF too small for the model: per-inference weight loads (the
    pre-issue behaviour), still bit-exact, and slower."""
    model, plan, x = vit
    ref = vit_ref
    res = fq.compile(model, plan, target="npu", batch_size=2)
    res.set_ratio(1.0)
    res(x[:2])
    c_res = res.npu_stats()["total_cycles"]
    for cfg in ({"resident_weights": 0}, {"wbuf_kb": 64}):
        npu = fq.compile(model, plan, target="npu", batch_size=2, npu_config=cfg)
        npu.set_ratio(1.0)
        ref.set_ratio(1.0)
        assert np.array_equal(npu(x[:2]), ref(x[:2]))
        st = npu.npu_stats()
        assert not st["weights_resident"] and st["weight_load_cycles"] == 0
        assert st["total_cycles"] > c_res, (cfg, st["total_cycles"], c_res)


def test_first_call_loads_the_weights(vit):
    model, plan, x = vit
    npu = fq.compile(model, plan, target="npu", batch_size=2)
    npu(x[:2])
    assert npu.npu_stats()["weights_loaded_this_call"]
    npu(x[:2])
    assert not npu.npu_stats()["weights_loaded_this_call"]


def _token_model(tmp_path, graph):
    """A small transformer-like graph with awkward sizes: 7 tokens (odd softmax rows), a 48-wide
    layer norm (not a power of two: its divisions do not become exact multiplies), one attention
    head (act x act MatMuls, Transpose), the erf GELU, a residual add; output [N, 7, 10]."""
    T, C = 7, 24
    g = graph((T, C), seed=3)
    x0 = g.cur
    h = g.matmul(C, 48)
    g.node("LayerNormalization", [h, g.const(g.rng.uniform(0.5, 1.5, 48)), g.const(g.rng.standard_normal(48) * 0.1)],
           axis=-1, epsilon=1e-5)
    t = g.matmul(48, C)
    g.cur = x0
    q = g.matmul(C, C)
    g.cur = x0
    k = g.matmul(C, C)
    kt = g.node("Transpose", [k], perm=[0, 2, 1])
    s = g.node("MatMul", [q, kt])
    s = g.node("Mul", [s, g.const(np.float32(0.2))])
    a = g.node("Softmax", [s], axis=-1)
    o = g.node("MatMul", [a, t])
    r = g.node("Add", [o, x0])
    g.cur = r
    u = g.matmul(C, 32)
    d = g.node("Div", [u, g.const(np.float32(1.4142135))])
    e = g.node("Erf", [d])
    e = g.node("Add", [e, g.const(np.float32(1.0))])
    m = g.node("Mul", [u, e])
    g.node("Mul", [m, g.const(np.float32(0.5))])
    g.matmul(32, 10)
    return g.save(tmp_path / "tokens.onnx", out_rank=3), (T, C)


def test_token_operators_with_awkward_shapes_bit_exact(tmp_path, graph):
    path, shape = _token_model(tmp_path, graph)
    model = fq.load_model(path)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16,) + shape).astype(np.float32)
    plan = fq.quantize(model, calib, search="range", group_size=8, progress=False)
    x = rng.standard_normal((3,) + shape).astype(np.float32) * 1.5
    npu = fq.compile(model, plan, target="npu", batch_size=3)
    ref = fq.compile(model, plan, target="llvm", batch_size=3)
    for r in LEVELS:
        npu.set_ratio(r)
        ref.set_ratio(r)
        a, b = npu(x), ref(x)
        assert np.array_equal(a, b), (r, float(np.abs(a - b).max()))
    st = npu.npu_stats()
    assert {l["layer"] for l in st["layers"]} == set(range(plan.num_layers))


def test_vit_dynamic_extraction_bit_exact(vit):
    """Dynamic extraction (per-sample activation shifts from the live tensor): the vector unit's
    requantizing pass of a token operator also tracks the group maxima for its dynamic consumer."""
    model, plan, x = vit
    dyn = fq.Plan.loads(plan.dumps())
    dyn.dynamic = True
    npu = fq.compile(model, dyn, target="npu", batch_size=2)
    ref = fq.compile(model, dyn, target="llvm", batch_size=2)
    for r in (0.0, 0.5, 1.0):
        npu.set_ratio(r)
        ref.set_ratio(r)
        a, b = npu(x[:2]), ref(x[:2])
        assert np.array_equal(a, b), (r, float(np.abs(a - b).max()))


def test_chained_operands_stream_even_when_nothing_fits_the_abuf(vit, vit_ref):
    """A chained operator (the GELU's erf -> + 1 -> * x -> * 0.5, the `* 0.25` after Q K^T) takes
    its operand from the stage before it: that stream needs no ABUF space and no DRAM traffic, also
    when the float tensor does not fit the ABUF (here: an ABUF of 0 bytes). Before, such an operand
    was charged a DRAM write and read (a ViT-B-sized block's GELU tensor, 2.4 MB, went through DRAM
    at every stage of the chain)."""
    from flexiq_tvm.targets.npu.tune import npu_programs

    model, plan, x = vit
    progs, _ = npu_programs(model, plan, 1, {"abuf_bytes": 0})
    adds = [a for P in progs for a in P.adds]
    chained = [a for a in adds if a.chain]
    assert len(chained) >= 4 * 4, len(chained)         # per block: erf, + 1, * x, * 0.5 at least
    for a in chained:
        assert a.onchip[a.chain_slot], a.op_name
    # every other float operand read from a producer is in DRAM (nothing fits an empty ABUF)
    others = [(a, k) for a in adds for k in range(2)
              if a.uses_slot(k) and a.in_param[k] < 0 and not (a.chain and k == a.chain_slot)]
    assert others and not any(a.onchip[k] for a, k in others)
    # the artifact built that way: still bit-exact (the streams change timing, not values), and
    # the empty ABUF really sends the other copies through DRAM (the default keeps them on chip)
    small = fq.compile(model, plan, target="npu", batch_size=2, npu_config={"abuf_bytes": 0})
    small.set_ratio(0.5)
    vit_ref.set_ratio(0.5)
    assert np.array_equal(small(x[:2]), vit_ref(x[:2]))
    assert sum(l["dram_bytes"] for l in small.npu_stats()["layers"]) > 200_000
