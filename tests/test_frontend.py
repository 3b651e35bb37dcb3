"""Model import: BatchNorm folding, layer discovery, Relax IRModule input, calibrators."""
import numpy as np
import onnx
import pytest
import tvm
from onnx.reference import ReferenceEvaluator
from tvm import relax

import flexiq_tvm as fq
from flexiq_tvm.calibrate.stats import collect_stats
from flexiq_tvm.quant.calibrators import clip_value


def _bn_graph(graph, tmp_path):
    g = graph((3, 8, 8), seed=3)
    g.conv(3, 8, 3, 1, 1)
    rng = np.random.default_rng(0)
    bn = [g.const(rng.uniform(0.5, 2, 8)), g.const(rng.standard_normal(8)), g.const(rng.standard_normal(8)),
          g.const(rng.uniform(0.5, 3, 8))]
    g.node("BatchNormalization", [g.cur] + bn, epsilon=1e-3)
    g.relu()
    g.conv(8, 4, 1, 1, 0, bias=False)
    g.node("BatchNormalization", [g.cur] + [g.const(v) for v in (np.ones(4), np.zeros(4), np.full(4, .5), np.full(4, 2.))])
    return g.save(tmp_path / "bn.onnx")


def test_batchnorm_is_folded_and_outputs_kept(graph, tmp_path):
    path = _bn_graph(graph, tmp_path)
    model = fq.load_model(path)
    assert "batch_norm" not in model.mod["main"].script()
    assert model.layer_names == ["conv2d_0", "conv2d_1"]
    assert model.layers[0].spec.act_unsigned is False and model.layers[1].spec.act_unsigned is True
    assert model.layers[0].bias_var is not None
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ReferenceEvaluator(onnx.load(path)).run(None, {"input": x})[0]
    got = fq.compile_float(model, 2)["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_relax_module_input_matches_onnx_path(graph, tmp_path):
    g = graph((3, 10, 10), seed=8)
    g.conv(3, 8, 3, 2, 1)
    g.relu()
    g.flatten()
    g.gemm(8 * 5 * 5, 6)
    path = g.save(tmp_path / "m.onnx")
    from tvm.relax.frontend.onnx import from_onnx
    mod = from_onnx(onnx.load(path), keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    with pytest.raises(fq.ModelError, match="params"):
        fq.load_model(mod)
    from_relax = fq.load_model(mod, params=params["main"])
    from_file = fq.load_model(path)
    assert from_relax.fingerprint == from_file.fingerprint
    calib = np.random.default_rng(2).standard_normal((16, 3, 10, 10)).astype(np.float32)
    plan = fq.quantize(from_file, calib, group_size=8, search="range", recover=False, progress=False)
    a, b = fq.compile(from_file, plan, batch_size=2), fq.compile(from_relax, plan, batch_size=2)
    for r in (0.0, 0.5, 1.0):
        a.set_ratio(r)
        b.set_ratio(r)
        assert np.array_equal(a(calib[:4]), b(calib[:4]))


def test_calibrators_order_and_channel_stats(graph, tmp_path):
    g = graph((2, 6, 6), seed=4)
    g.conv(2, 4, 3, 1, 1)
    model = fq.load_model(g.save(tmp_path / "c.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2, 6, 6)).astype(np.float32)
    x[:, 1] *= 10
    x[7, 0, 3, 3] = 400.0                                       # one outlier
    (st,) = collect_stats(model, x, batch_size=16, progress=False)
    np.testing.assert_allclose(st.channel_absmax, np.abs(x).max(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(st.channel_sqmean, (x.astype(np.float64) ** 2).mean(axis=(0, 2, 3)), rtol=1e-5)
    assert st.channel_sample.shape[0] == 2 and st.count == 40
    mx, pc, ms = (clip_value(st, c, unsigned=False) for c in ("max", "percentile", "mse"))
    assert mx == pytest.approx(400.0)
    assert pc < mx and ms < mx
