"""Transformers: Linear layers on (batch, tokens, features) inputs inside attention and MLP blocks.

Every Linear (constant weight) is a FlexiQ dense layer reducing over the token features; q @ k^T and
attn @ v (two activations) stay float, quietly; LayerNorm / Softmax / GELU stay float. Checked bit
for bit against the numpy reference, and the shipped Fashion-MNIST ViT against its accuracy bars.
"""
import math
import os
import warnings

import numpy as np
import pytest
import tvm

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.api import compile_with_taps  # noqa: E402
from flexiq_tvm.frontend.layers import FloatFallbackWarning  # noqa: E402
from flexiq_tvm.quant.reference import LayerReference  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flexiq_tvm", "assets")
TOKENS, DIM = 6, 16


class TinyBlock(nn.Module):
    """One pre-norm encoder block on token input (N, 6, 16), then mean-pool and a head."""

    def __init__(self, heads=2, mlp=32, classes=5):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, mlp), nn.Linear(mlp, DIM)
        self.head = nn.Linear(DIM, classes)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def tiny_block(seed=0):
    torch.manual_seed(seed)
    net = TinyBlock().eval()
    with torch.no_grad():                       # uneven channel ranges, as in trained models
        for lin in (net.qkv, net.proj, net.fc1, net.fc2):
            lin.weight.mul_(torch.rand(1, lin.in_features) * 1.5 + 0.25)
    return net


def export_onnx(net, example, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # TracerWarning / legacy-exporter DeprecationWarning
        _export(net, example, path)
    return str(path)


def _export(net, example, path):
    torch.onnx.export(net, example, str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def quantize_plain(model, calib, **kw):
    """fq.quantize without post-search bias correction (the bit-exact checks compare against the
    plain per-layer reference)."""
    import inspect

    if "recover" in inspect.signature(fq.quantize).parameters:
        kw.setdefault("recover", False)
    return fq.quantize(model, calib, progress=False, **kw)


def tokens(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, TOKENS, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    net = tiny_block()
    path = export_onnx(net, torch.from_numpy(tokens(2)), tmp_path_factory.mktemp("tf") / "block.onnx")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = fq.load_model(path)
    plan = quantize_plain(model, tokens(48), group_size=8, search="range")
    return net, model, plan, rec


def test_attention_layers_found_and_float_ops_quiet(block):
    _, model, plan, rec = block
    assert not [w for w in rec if issubclass(w.category, FloatFallbackWarning)], [str(w.message) for w in rec]
    assert model.input_shape == (TOKENS, DIM)
    specs = model.specs
    assert [s.op for s in specs] == ["dense"] * 5                 # qkv, proj, fc1, fc2, head
    assert [s.in_shape for s in specs[:4]] == [(TOKENS, DIM)] * 3 + [(TOKENS, 32)]
    assert [s.out_shape[-1] for s in specs] == [3 * DIM, DIM, 32, DIM, 5]
    assert specs[4].in_shape == (DIM,)
    assert len(model.act_matmuls) == 2                             # q @ k^T and attn @ v
    script = model.mod["main"].script()
    for op in ("layer_norm", "softmax"):
        assert op in script
    assert plan.num_layers == 5 and [l.n_groups for l in plan.layers] == [2, 2, 2, 4, 2]


def test_attention_block_bit_exact(block):
    _, model, plan, _ = block
    x = tokens(3, seed=7) * 1.3
    vm = compile_with_taps(model, plan, batch_size=3)
    refs = [LayerReference(s, p) for s, p in zip(model.specs, plan.layers)]
    rng = np.random.default_rng(0)
    grid = [plan.counts_for_ratio(r) for r in (0.0, 0.5, 1.0)]
    grid.append(np.array([rng.integers(0, l.n_groups + 1) for l in plan.layers], np.int32))
    for counts in grid:
        counts = np.asarray(counts, np.int32)
        outs = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(counts))
        for i, ref in enumerate(refs):
            xin, yout = outs[1 + 2 * i].numpy(), outs[2 + 2 * i].numpy()
            assert xin.shape[1:] == ref.spec.in_shape                       # 3-D token input reaches the layer
            expect = ref.forward(xin, counts[i])
            assert np.array_equal(yout, expect), (ref.spec.name, counts.tolist(), float(np.abs(yout - expect).max()))


def test_attention_block_int8_tracks_fp32(block):
    net, model, plan, _ = block
    x = tokens(16, seed=3)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    fp32 = fq.compile_float(model, 8)
    got = np.concatenate([fp32["main"](tvm.runtime.tensor(x[s:s + 8])).numpy() for s in (0, 8)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    cm = fq.compile(model, plan, batch_size=8)
    cos = {}
    for r in (0.0, 0.5, 1.0):
        cm.set_ratio(r)
        y = cm(x)
        cos[r] = float(np.sum(y * want) / (np.linalg.norm(y) * np.linalg.norm(want)))
    assert cos[0.0] > 0.999 and cos[0.5] > 0.99 and cos[1.0] > 0.95, cos


def test_dense_on_4d_input(tmp_path, graph):
    """Leading axes of any rank fold into GEMM rows."""
    g = graph((3, 4, 8), seed=4)
    g.matmul(8, 12)
    g.relu()
    g.matmul(12, 6)
    path = g.save(tmp_path / "d4.onnx", out_rank=4)
    model = fq.load_model(path)
    assert [s.in_shape for s in model.specs] == [(3, 4, 8), (3, 4, 12)]
    assert model.specs[1].act_unsigned
    rng = np.random.default_rng(0)
    plan = quantize_plain(model, rng.standard_normal((16, 3, 4, 8)).astype(np.float32), group_size=4,
                          search="range")
    x = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    vm = compile_with_taps(model, plan, batch_size=2)
    for counts in ([0, 0], [1, 2], [2, 3]):
        outs = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.asarray(counts, np.int32)))
        for i, (s, p) in enumerate(zip(model.specs, plan.layers)):
            ref = LayerReference(s, p).forward(outs[1 + 2 * i].numpy(), counts[i])
            assert np.array_equal(outs[2 + 2 * i].numpy(), ref)


@pytest.mark.skipif(not os.path.exists(os.path.join(ASSETS, "fashion_vit.onnx")), reason="ViT asset not built")
def test_shipped_vit_accuracy_bars():
    """INT8 within 0.5 points of FP32; ratio 0.5 within 1.5 points of INT8 (1000 test images, range search)."""
    from flexiq_tvm.report.evaluate import evaluate

    model = fq.load_model(os.path.join(ASSETS, "fashion_vit.onnx"))
    assert len(model.layers) == 18 and len(model.act_matmuls) == 8     # embed conv + 4 x (qkv, proj, fc1, fc2) + head
    plan = quantize_plain(model, os.path.join(ASSETS, "fashion_calib.npz"), search="range", search_samples=64)
    z = np.load(os.path.join(ASSETS, "fashion_test.npz"))
    rep = evaluate(model, plan, {"inputs": z["inputs"][:1000], "labels": z["labels"][:1000]}, ratios=[0.0, 0.5],
                   batch_size=50, latency=False, progress=False)
    fp32, int8, half = rep["fp32"]["top1"], rep["ratios"][0]["top1"], rep["ratios"][1]["top1"]
    assert fp32 > 0.85
    assert int8 >= fp32 - 0.005, rep
    assert half >= int8 - 0.015, rep
