"""The compiled FlexiQ model against the numpy integer reference, layer by layer, bit for bit."""
import subprocess
import sys

import numpy as np
import pytest
import tvm

import flexiq_tvm as fq
from flexiq_tvm.api import compile_with_taps
from flexiq_tvm.calibrate.data import load_data
from flexiq_tvm.quant.reference import LayerReference
from conftest import GRAPHS, assert_taps_bit_exact, counts_grid


def _check_layers_bit_exact(model, plan, x, counts_list, batch):
    vm = compile_with_taps(model, plan, batch_size=batch)
    assert_taps_bit_exact(vm, [LayerReference(s, p) for s, p in zip(model.specs, plan.layers)], x, counts_list)


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("group_size", [1, 8])
def test_random_graphs_bit_exact(tmp_path, graph, name, group_size):
    shape, steps = GRAPHS[name]
    g = graph(shape, seed=hash(name) % 1000)
    steps(g)
    path = g.save(tmp_path / f"{name}.onnx")
    model = fq.load_model(path)
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((24,) + shape).astype(np.float32)
    # both weight roundings reach the kernels: stored (compensated) codes and re-derived nearest ones
    plan = fq.quantize(model, calib, group_size=group_size, calibrator="percentile", search="range", recover=False,
                       rounding="nearest" if group_size == 1 else "compensated", progress=False)
    assert (plan.layers[0].weight_codes is None) == (group_size == 1)
    x = rng.standard_normal((3,) + shape).astype(np.float32) * 1.5   # beyond the calibrated range too
    _check_layers_bit_exact(model, plan, x, counts_grid(plan), batch=3)


@pytest.fixture(scope="module")
def demo(demo_paths):
    model = fq.load_model(demo_paths["model"])
    plan = fq.quantize(model, demo_paths["calib"], search="sensitivity", recover=False, progress=False)
    x, labels = load_data(demo_paths["test"], model)
    return model, plan, x, labels


def test_demo_model_layers_bit_exact(demo):
    model, plan, x, _ = demo
    _check_layers_bit_exact(model, plan, x[:8], counts_grid(plan, seed=3), batch=8)


def test_set_ratio_round_trip_and_counts(demo):
    model, plan, x, _ = demo
    cm = fq.compile(model, plan, batch_size=4)
    xs = x[:10]
    cm.set_ratio(0.0)
    y0 = cm(xs)
    cm.set_ratio(0.5)
    y5 = cm(xs)
    assert cm.counts.tolist() == plan.counts_for_ratio(0.5).tolist()
    assert not np.array_equal(y0, y5)
    cm.set_ratio(0.0)
    assert np.array_equal(cm(xs), y0)
    cm.set_ratio(0.5)
    assert np.array_equal(cm(xs), y5)
    # explicit per-layer counts equal to a level reproduce that level
    cm.set_counts(plan.counts_for_ratio(0.5))
    assert np.array_equal(cm(xs), y5)
    # any batch size works through the fixed-batch artifact, and results do not depend on it
    assert np.array_equal(cm(xs[:3]), y5[:3])
    for bad in (-0.1, 1.01, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"ratio"):
            cm.set_ratio(bad)
    with pytest.raises(ValueError, match="count"):
        cm.set_counts([99] * plan.num_layers)


def test_int8_close_to_fp32_and_ratios_monotone_in_mac_share(demo):
    model, plan, x, labels = demo
    cm = fq.compile(model, plan, batch_size=50)
    fp32 = fq.compile_float(model, 50)
    ref = np.concatenate([fp32["main"](tvm.runtime.tensor(x[s:s + 50])).numpy() for s in range(0, 500, 50)])
    cm.set_ratio(0.0)
    y = cm(x[:500])
    assert np.mean(y.argmax(1) == ref.argmax(1)) > 0.98
    shares = []
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        cm.set_ratio(r)
        shares.append(cm.mac_ratio)
        assert abs(cm.mac_ratio - r) < 0.1
    assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] == 1.0


def test_ratio_switch_is_fast(demo):
    model, plan, _, _ = demo
    cm = fq.compile(model, plan, batch_size=1)
    import time
    cm(np.zeros((1,) + model.input_shape, np.float32))     # the VM is live: switches lower weights
    for r in (0.25, 0.5):
        cm.set_ratio(r)                                    # first use: the weights are lowered once
        assert cm.last_lowering_s > 0
    t = time.perf_counter()
    for i in range(20000):
        cm.set_ratio(0.25 if i & 1 else 0.5)
    per_switch = (time.perf_counter() - t) / 20000
    assert per_switch < 10e-6, per_switch                  # recently used ratios: lookups
    assert cm.last_lowering_s == 0


def test_export_load_fresh_process_bit_exact(demo, tmp_path):
    model, plan, x, _ = demo
    cm = fq.compile(model, plan, batch_size=2)
    cm.set_ratio(0.75)
    y = cm(x[:5])
    art = tmp_path / "m.so"
    cm.export(art)
    np.save(tmp_path / "x.npy", x[:5])
    np.save(tmp_path / "y.npy", y)
    code = ("import numpy as np, flexiq_tvm as fq\n"
            f"cm = fq.load_artifact({str(art)!r})\n"
            "cm.set_ratio(0.75)\n"
            f"y = cm(np.load({str(tmp_path / 'x.npy')!r}))\n"
            f"assert np.array_equal(y, np.load({str(tmp_path / 'y.npy')!r})), 'outputs differ'\n"
            "assert cm.plan.num_layers == %d and cm.batch_size == 2\n"
            "print('OK')\n" % plan.num_layers)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_whole_model_against_numpy_reference(demo, demo_paths, graph, tmp_path):
    """Compiled model vs an ONNX-reference + integer-reference execution, at several counts.

    A pure conv/ReLU graph has no float reductions, so the two agree bit for bit; through the demo's
    global average pool (summation order differs) a code may round differently, so it is compared
    by agreement and a tight tolerance."""
    from flexiq_tvm.report.reference_model import build_onnx_reference

    g = graph((4, 9, 9), seed=21)
    g.conv(4, 16, 3, 1, 1)
    g.relu()
    g.conv(16, 16, 3, 2, 1, groups=4)
    g.relu()
    g.conv(16, 8, 1, 1, 0, bias=False)
    path = g.save(tmp_path / "plain.onnx")
    model = fq.load_model(path)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 4, 9, 9)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=False, progress=False)
    ref = build_onnx_reference(path, model, plan)
    cm = fq.compile(model, plan, batch_size=4)
    for counts in counts_grid(plan, seed=5):
        cm.set_counts(counts)
        assert np.array_equal(cm(calib[:4]), ref(calib[:4], counts)), counts

    model, plan, x, _ = demo
    ref = build_onnx_reference(demo_paths["model"], model, plan)
    cm = fq.compile(model, plan, batch_size=16)
    for counts in counts_grid(plan, seed=6)[:4]:
        cm.set_counts(counts)
        y, r = cm(x[:16]), ref(x[:16], counts)
        assert np.mean(y.argmax(1) == r.argmax(1)) >= 15 / 16
        assert np.abs(y - r).max() <= 0.05 * np.abs(r).max(), counts
