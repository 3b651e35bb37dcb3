"""PyTorch input: `fq.load_model(module, example_inputs)` through tvm.relax.frontend.torch, checked
against the ONNX import of the same module: same layers, same plan, same outputs."""
import warnings

import numpy as np
import pytest
import tvm

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.frontend.layers import FloatFallbackWarning  # noqa: E402
from test_transformer import TOKENS, DIM, export_onnx, quantize_plain, tiny_block, tokens  # noqa: E402


class SmallCNN(nn.Module):
    """conv-BN-ReLU6, depthwise conv-BN-ReLU, pointwise conv, residual, pool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_cnn(seed=0):
    torch.manual_seed(seed)
    net = SmallCNN()
    with torch.no_grad():            # non-trivial BatchNorm statistics, so folding matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def images(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


CASES = {"cnn": (small_cnn, images), "transformer": (tiny_block, tokens)}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    make, data = CASES[request.param]
    net = make()
    example = torch.from_numpy(data(1))                    # batch-1 example: the batch axis stays dynamic
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        from_torch = fq.load_model(net, example)
    assert not [w for w in rec if issubclass(w.category, FloatFallbackWarning)]
    path = export_onnx(net, example, tmp_path_factory.mktemp("tq") / f"{request.param}.onnx")
    from_onnx = fq.load_model(path)
    return request.param, net, from_torch, from_onnx, data


def test_same_layers_and_fingerprint(pair):
    name, _, mt, mo, _ = pair
    assert mt.layer_names == mo.layer_names
    if name == "transformer":
        # no BatchNorm: the weights are the module's, bit for bit. (With BatchNorm, torch's ONNX
        # exporter and our fold round differently in the last bit, so the fingerprints differ.)
        assert mt.fingerprint == mo.fingerprint
    assert mt.input_shape == mo.input_shape
    assert len(mt.act_matmuls) == len(mo.act_matmuls)
    for a, b in zip(mt.specs, mo.specs):
        assert (a.op, a.in_shape, a.out_shape, a.act_unsigned) == (b.op, b.in_shape, b.out_shape, b.act_unsigned)
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-5, atol=1e-6)      # BN folded alike
        np.testing.assert_allclose(a.bias if a.bias is not None else 0, b.bias if b.bias is not None else 0,
                                   rtol=1e-5, atol=1e-6)


def test_same_plan_and_outputs(pair):
    name, net, mt, mo, data = pair
    calib, x = data(32, seed=2), data(6, seed=3)
    plan_o = quantize_plain(mo, calib, group_size=8, search="range")
    plan_t = quantize_plain(mt, calib, group_size=8, search="range")
    assert plan_t.levels == plan_o.levels and plan_t.schedule == plan_o.schedule
    if mt.fingerprint == mo.fingerprint:
        assert plan_t.dumps() == plan_o.dumps() or plan_t.layers[0].name == plan_o.layers[0].name
    for lt, lo in zip(plan_t.layers, plan_o.layers):
        assert np.array_equal(lt.rank, lo.rank)
        np.testing.assert_allclose(lt.act_scale, lo.act_scale, rtol=1e-5)
        np.testing.assert_allclose(lt.weight_scale, lo.weight_scale, rtol=1e-5)
    # FP32: both imports reproduce torch
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    for m in (mt, mo):
        got = fq.compile_float(m, 6)["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # each import compiled with its own plan: outputs agree at every ratio
    ct, co = fq.compile(mt, plan_t, batch_size=3), fq.compile(mo, plan_o, batch_size=3)
    for r in (0.0, 0.5, 1.0):
        ct.set_ratio(r)
        co.set_ratio(r)
        yt, yo = ct(x), co(x)
        np.testing.assert_allclose(yt, yo, rtol=1e-5, atol=1e-5 * float(np.abs(yo).max()))
        assert np.array_equal(yt.argmax(-1), yo.argmax(-1))


def test_torch_errors():
    with pytest.raises(fq.ModelError, match="example_inputs is required"):
        fq.load_model(small_cnn())
    with pytest.raises(fq.ModelError, match="single-input"):
        fq.load_model(small_cnn(), (torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)))

    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:                          # data-dependent control flow: torch.export refuses
                return x
            return -x

    with pytest.raises(fq.ModelError, match="Bad: export/import failed"):
        fq.load_model(Bad(), torch.zeros(2, 4))


def test_numpy_example_and_shape():
    m = fq.load_model(tiny_block(), tokens(1).astype(np.float64))
    assert m.input_shape == (TOKENS, DIM) and m.name == "TinyBlock"
