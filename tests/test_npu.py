"""The FlexiQ NPU target (issue 5): BYOC partition + codegen + simulator runtime.

Bit-exact against the numpy integer reference (layer by layer through taps, and whole models
against the llvm target, itself checked against the reference in test_end_to_end.py), at ratios
0 / 0.5 / 1 and random per-layer counts, on random conv / dense / depthwise / grouped graphs
and the demo model, with the default array and with a tiny one that forces every tiling path
(K chunks accumulated in OBUF, several output-channel blocks, weight reloads); timing-model
properties; export / load in a fresh process; configuration errors.
"""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tvm

import flexiq_tvm as fq
from flexiq_tvm.calibrate.data import load_data
from flexiq_tvm.quant.reference import LayerReference
from flexiq_tvm.targets.npu import NPUConfig, NPUConfigError
from conftest import GRAPHS, assert_taps_bit_exact, counts_grid

# a tiny NPU: 8x8 array, 2 KiB SRAMs (1 KiB banks), no activation SRAM -> K chunks, several
# o-blocks, weight reloads, every layer input through DRAM
TINY = {"rows": 8, "cols": 8, "ibuf_bytes": 2048, "wbuf_bytes": 2048, "obuf_bytes": 2048, "abuf_bytes": 0,
        "dma_bytes_per_cycle": 8}


def _quantize(model, calib, **kw):
    """fq.quantize without the per-ratio bias corrections: the layer taps are compared with the numpy
    reference, which has none (default plans with bias rows: tests/test_npu_flex.py)."""
    import inspect

    if "recover" in inspect.signature(fq.quantize).parameters:
        kw["recover"] = False
    return fq.quantize(model, calib, progress=False, **kw)


def _npu_taps(model, plan, batch, npu_config=None):
    """compile_with_taps for the npu target with a chosen configuration."""
    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
    from flexiq_tvm.passes.tap_outputs import TapOutputs, flexiq_layer_taps
    from flexiq_tvm.targets import get_target
    from tvm import relax

    mod = flexiq_rewrite(model.mod, model.layers, plan, int(batch))
    taps = flexiq_layer_taps(mod["main"])
    flat = [e for i in sorted(taps) for e in taps[i]]
    tgt = get_target("npu", npu_config=npu_config)
    ex = tgt.build(TapOutputs(flat)(mod))
    return relax.VirtualMachine(ex, tvm.cpu()), tgt


def _check_taps(model, plan, x, counts_list, npu_config=None):
    vm, tgt = _npu_taps(model, plan, x.shape[0], npu_config)
    on_npu = {L.layer for P in tgt.programs.values() for L in P.layers}
    assert on_npu == set(range(plan.num_layers)), on_npu          # every layer offloaded
    assert_taps_bit_exact(vm, [LayerReference(s, p) for s, p in zip(model.specs, plan.layers)], x, counts_list)


def _graph_model(tmp_path, graph, name, group_size, seed=None):
    shape, steps = GRAPHS[name]
    g = graph(shape, seed=seed if seed is not None else sum(map(ord, name)))
    steps(g)
    model = fq.load_model(g.save(tmp_path / f"{name}.onnx"))
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((16,) + shape).astype(np.float32)
    plan = _quantize(model, calib, group_size=group_size, search="range")
    x = rng.standard_normal((2,) + shape).astype(np.float32) * 1.5
    return model, plan, x


@pytest.mark.parametrize("name,group_size,cfg", [
    ("conv_stack", 8, None), ("depthwise", 1, None), ("grouped_dilated", 8, None),
    ("conv_stack", 1, TINY), ("grouped_dilated", 1, TINY),
])
def test_random_graphs_layers_bit_exact(tmp_path, graph, name, group_size, cfg):
    model, plan, x = _graph_model(tmp_path, graph, name, group_size)
    _check_taps(model, plan, x, counts_grid(plan), cfg)


@pytest.mark.parametrize("name,cfg", [("conv_stack", TINY), ("depthwise", None), ("grouped_dilated", None)])
def test_random_graphs_whole_model_matches_llvm(tmp_path, graph, name, cfg):
    """Fused ReLU, merged multi-layer programs and INT8 requantization between NPU layers."""
    model, plan, x = _graph_model(tmp_path, graph, name, 8)
    cm = fq.compile(model, plan, target="npu", batch_size=2, npu_config=cfg)
    ref = fq.compile(model, plan, target="llvm", batch_size=2)
    for counts in counts_grid(plan, seed=2):
        cm.set_counts(counts)
        ref.set_counts(counts)
        assert np.array_equal(cm(x), ref(x)), counts.tolist()
        st = cm.npu_stats()
        assert [l["k4"] for l in st["layers"]] == [int(c) for c in counts]   # the register came from counts


@pytest.fixture(scope="module")
def demo(demo_paths):
    model = fq.load_model(demo_paths["model"])
    calib, _ = load_data(demo_paths["calib"], model)
    plan = _quantize(model, calib[:64], search="range")
    x, _ = load_data(demo_paths["test"], model)
    return model, plan, x[:4]


@pytest.fixture(scope="module")
def demo_npu(demo):
    model, plan, _ = demo
    return fq.compile(model, plan, target="npu", batch_size=2)


def test_demo_layers_bit_exact(demo):
    model, plan, x = demo
    _check_taps(model, plan, x[:2], counts_grid(plan, seed=3))


def test_demo_whole_model_ratios(demo, demo_npu):
    model, plan, x = demo
    ref = fq.compile(model, plan, target="llvm", batch_size=2)
    cycles = {}
    for r in (0.0, 0.5, 1.0):
        demo_npu.set_ratio(r)
        ref.set_ratio(r)
        assert np.array_equal(demo_npu(x[:2]), ref(x[:2])), r
        cycles[r] = demo_npu.npu_stats()["total_cycles"]
    assert cycles[0.0] > cycles[0.5] > cycles[1.0]
    # issue bar: at ratio 0.5 at least 45% of the all-4-bit speedup
    frac = (cycles[0.0] - cycles[0.5]) / (cycles[0.0] - cycles[1.0])
    assert frac >= 0.45, (cycles, frac)


def test_export_load_fresh_process(demo, demo_npu, tmp_path):
    _, plan, x = demo
    demo_npu.set_ratio(0.5)
    y = demo_npu(x[:2])
    st = demo_npu.npu_stats()
    art = tmp_path / "npu.so"
    demo_npu.export(art)
    np.save(tmp_path / "x.npy", x[:2])
    np.save(tmp_path / "y.npy", y)
    code = ("import json, numpy as np, flexiq_tvm as fq\n"
            f"cm = fq.load_artifact({str(art)!r})\n"
            "cm.set_ratio(0.5)\n"
            f"y = cm(np.load({str(tmp_path / 'x.npy')!r}))\n"
            f"assert np.array_equal(y, np.load({str(tmp_path / 'y.npy')!r})), 'outputs differ'\n"
            "s = cm.npu_stats()\n"
            "print(json.dumps([[l['layer'], l['total'], l['compute'], l['dma'], l['vector']] for l in s['layers']]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == [[l["layer"], l["total"], l["compute"], l["dma"], l["vector"]] for l in st["layers"]]


# ---------------------------------------------------------------- timing model
def _one_conv(tmp_path, graph, cin, cout, hw, k=3, group_size=16):
    g = graph((cin, hw, hw), seed=5)
    g.conv(cin, cout, k, 1, k // 2)
    model = fq.load_model(g.save(tmp_path / f"c{cin}_{cout}_{hw}.onnx"))
    calib = np.random.default_rng(0).standard_normal((8, cin, hw, hw)).astype(np.float32)
    plan = _quantize(model, calib, group_size=group_size, search="range")
    return model, plan, calib[:1]


def _layer_stats(cm, x, ratio):
    cm.set_ratio(ratio)
    cm(x)
    return cm.npu_stats()["layers"][0]


def test_compute_bound_layer_halves_at_ratio_1(tmp_path, graph):
    model, plan, x = _one_conv(tmp_path, graph, 64, 64, 12)
    cm = fq.compile(model, plan, target="npu", npu_config={"dma_bytes_per_cycle": 256})
    s0, s1 = _layer_stats(cm, x, 0.0), _layer_stats(cm, x, 1.0)
    assert s0["bound"] == "compute"
    assert 0.45 <= s1["compute"] / s0["compute"] <= 0.56, (s0, s1)
    assert s1["total"] / s0["total"] <= 0.6
    assert s1["macs4"] == s0["macs8"] and s1["macs8"] == 0


def test_dma_bound_layer_does_not_speed_up(tmp_path, graph):
    model, plan, x = _one_conv(tmp_path, graph, 16, 16, 12, k=1)
    cm = fq.compile(model, plan, target="npu", npu_config={"dma_bytes_per_cycle": 1})
    s0, s1 = _layer_stats(cm, x, 0.0), _layer_stats(cm, x, 1.0)
    assert s0["bound"] == "dma" and s0["dma"] > 3 * s0["compute"]
    assert s1["total"] >= 0.97 * s0["total"], (s0, s1)
    assert s1["dma"] == s0["dma"]                       # 4-bit operands come from the same INT8 bytes


@pytest.mark.parametrize("cfg", [None, TINY, {"rows": 16, "cols": 4, "ibuf_kb": 4, "wbuf_kb": 1, "obuf_kb": 1}])
def test_tiling_never_exceeds_sram(demo, cfg):
    model, plan, x = demo
    cm = fq.compile(model, plan, target="npu", batch_size=2, npu_config=cfg)
    c = NPUConfig.from_any(cfg)
    cm.set_ratio(1.0)
    cm(x[:2])
    st = cm.npu_stats()
    assert len(st["layers"]) == plan.num_layers
    for l in st["layers"]:
        assert 0 < l["ibuf_max"] <= c.ibuf_bytes // 2
        assert 0 < l["wbuf_max"] <= c.wbuf_bytes // 2
        assert 0 < l["obuf_max"] <= c.obuf_bytes // 2
        assert l["total"] > 0
    # each unit is in-order, so its busy cycles fit in the programs' spans (per layer they need not:
    # a layer's first weight tile is prefetched, and counted, while the previous layer finishes)
    assert st["total_cycles"] >= max(st["compute_cycles"], st["dma_cycles"], st["vector_cycles"])


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("cfg,msg", [
    ({"rowz": 4}, "unknown key 'rowz'"),
    ({"rows": 0}, r"rows=0 is outside"),
    ({"cols": 2.5}, "cols must be an integer"),
    ({"obuf_bytes": 260, "cols": 64}, "obuf_bytes"),
    ({"clock_mhz": -1}, "clock_mhz"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a dict"),
])
def test_bad_config_rejected(cfg, msg):
    with pytest.raises(NPUConfigError, match=msg):
        NPUConfig.from_any(cfg)


def test_bad_config_through_compile_and_cli(demo, demo_paths, tmp_path):
    model, plan, _ = demo
    with pytest.raises(ValueError, match="unknown key 'array_size'"):
        fq.compile(model, plan, target="npu", npu_config={"array_size": 8})
    from flexiq_tvm.cli import main

    plan_path = tmp_path / "p.flexiq"
    plan.save(plan_path)
    rc = main(["compile", demo_paths["model"], "--plan", str(plan_path), "--target", "npu", "--npu-config", '{"rows": -3}',
               "-o", str(tmp_path / "m.so")])
    assert rc == 2 and not (tmp_path / "m.so").exists()


def test_layer_too_big_for_sram_stays_on_host(demo):
    model, plan, x = demo
    cfg = {"rows": 4, "cols": 4, "ibuf_bytes": 160, "wbuf_bytes": 256, "obuf_bytes": 256}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cm = fq.compile(model, plan, target="npu", batch_size=2, npu_config=cfg)
    assert any("runs on the host" in str(m.message) for m in w)
    ref = fq.compile(model, plan, target="llvm", batch_size=2)
    cm.set_ratio(0.5)
    ref.set_ratio(0.5)
    assert np.array_equal(cm(x[:2]), ref(x[:2]))
    on_npu = {l["layer"] for l in cm.npu_stats()["layers"]}
    assert on_npu and on_npu != set(range(plan.num_layers))
