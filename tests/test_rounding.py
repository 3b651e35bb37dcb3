"""Error-compensating INT8 weight rounding: the Gram matrices, the codes, and the plan that stores them."""
import numpy as np
import pytest

from flexiq_tvm.quant.int8 import quantize_weight
from flexiq_tvm.quant.layer import LayerSpec
from flexiq_tvm.quant.plan import Plan, PlanError
from flexiq_tvm.quant.rounding import compensated_codes, input_gram, output_error


def _conv_direct(x, w, pad, stride, groups):
    """Plain-loop conv (NCHW / OIHW, float64): the independent reference of the tests below."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    OH, OW = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    out = np.zeros((N, O, OH, OW))
    opg = O // groups
    for o in range(O):
        g = o // opg
        for i in range(OH):
            for j in range(OW):
                patch = xp[:, g * Cg:(g + 1) * Cg, i * stride:i * stride + kh, j * stride:j * stride + kw]
                out[:, o, i, j] = (patch * w[o]).sum(axis=(1, 2, 3))
    return out


def _correlated(rng, shape, channel_axis):
    """Inputs whose channels (and, for images, neighbouring pixels) are strongly correlated, as
    real feature maps are: a shared component plus a mixed, spatially smoothed one."""
    C = shape[channel_axis]
    x = rng.standard_normal(shape)
    if len(shape) == 4:                                   # NCHW: 3x3 box blur
        p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        x = sum(p[:, :, i:i + shape[2], j:j + shape[3]] for i in range(3) for j in range(3)) / 3
    mix = rng.standard_normal((C, C)) * 0.5 + np.eye(C) + 0.7
    x = np.moveaxis(np.moveaxis(x, channel_axis, -1) @ mix, -1, channel_axis)
    return x.astype(np.float32)


@pytest.mark.parametrize("groups,C,O,k,stride", [(1, 6, 5, 3, 1), (6, 6, 6, 3, 2), (2, 4, 6, 1, 1)])
def test_conv_gram_gives_the_direct_output_error(groups, C, O, k, stride):
    rng = np.random.default_rng(groups + k)
    w = rng.standard_normal((O, C // groups, k, k)).astype(np.float32)
    H = W = 7
    OH = (H + 2 * (k // 2) - k) // stride + 1
    spec = LayerSpec("conv", "conv2d", w, None, (C, H, W), (O, OH, OH), groups=groups, strides=(stride, stride),
                     padding=(k // 2,) * 4)
    x = _correlated(rng, (3, C, H, W), 1)
    gram = input_gram(x, spec)
    q, s = quantize_weight(w)
    wq = q.astype(np.float64) * s.astype(np.float64)[:, None, None, None]
    direct = ((_conv_direct(x, wq, k // 2, stride, groups) - _conv_direct(x, w, k // 2, stride, groups)) ** 2).sum()
    assert output_error(w, s, q, gram, groups) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("groups,C,O,k", [(1, 12, 8, 3), (12, 12, 12, 3), (2, 32, 8, 1)])
def test_compensated_codes_lower_the_conv_output_error(groups, C, O, k):
    rng = np.random.default_rng(7 * groups + k)
    w = rng.standard_normal((O, C // groups, k, k)).astype(np.float32)
    spec = LayerSpec("conv", "conv2d", w, None, (C, 9, 9), (O, 9, 9), groups=groups, padding=(k // 2,) * 4)
    x = np.maximum(_correlated(rng, (4, C, 9, 9), 1), 0)          # post-ReLU: correlated, non-zero mean
    x[:, 0] = 0                                                     # a dead input channel
    gram = input_gram(x, spec)
    q0, s = quantize_weight(w)
    q1 = compensated_codes(w, s, gram, groups)
    assert q1.shape == w.shape and q1.dtype == np.int8
    assert q1.min() >= -127 and q1.max() <= 127
    wq = q1.astype(np.float64) * s.astype(np.float64)[:, None, None, None]
    e1 = ((_conv_direct(x, wq, k // 2, 1, groups) - _conv_direct(x, w, k // 2, 1, groups)) ** 2).sum()
    e0 = output_error(w, s, q0, gram, groups)
    assert e1 == pytest.approx(output_error(w, s, q1, gram, groups), rel=1e-9)
    assert e1 < 0.8 * e0
    # input channel 0 never fires in calibration: its weights (in group 0's outputs) stay nearest-rounded
    reads_channel_0 = slice(0, O // groups)
    np.testing.assert_array_equal(q1[reads_channel_0, 0], q0[reads_channel_0, 0])


def test_compensated_codes_dense_3d_tokens():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    spec = LayerSpec("fc", "dense", w, None, (5, 24), (5, 16))
    x = _correlated(rng, (6, 5, 24), 2)
    gram = input_gram(x, spec)
    np.testing.assert_allclose(gram[0], np.einsum("ntc,ntd->cd", x.astype(np.float64), x.astype(np.float64)),
                               rtol=1e-10)
    q0, s = quantize_weight(w)
    q1 = compensated_codes(w, s, gram)
    rows = x.reshape(-1, 24).astype(np.float64)
    err = ((rows @ (q1 * s[:, None].astype(np.float64)).T - rows @ w.T.astype(np.float64)) ** 2).sum()
    err0 = ((rows @ (q0 * s[:, None].astype(np.float64)).T - rows @ w.T.astype(np.float64)) ** 2).sum()
    assert err < 0.5 * err0
    assert np.abs(q1.astype(int) - q0).max() >= 1          # codes really moved


def test_compensated_codes_reject_a_gram_of_the_wrong_shape():
    w = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        compensated_codes(w, np.ones(4, np.float32), np.eye(5)[None])


def _plan_with_codes(rng):
    from flexiq_tvm.quant.build import build_plan
    from flexiq_tvm.quant.calibrators import TensorStats

    w = rng.standard_normal((8, 16)).astype(np.float32)
    spec = LayerSpec("fc", "dense", w, None, (16,), (8,))
    x = _correlated(rng, (64, 16), 1)
    st = TensorStats(channel_absmax=np.abs(x).max(0), channel_sqmean=(x.astype(np.float64) ** 2).mean(0),
                     minimum=float(x.min()), maximum=float(x.max()), sample=x.ravel(), count=64,
                     channel_sample=x.T.copy(), gram=input_gram(x, spec))
    return spec, build_plan([spec], [st], group_size=4, rounding="compensated")


def test_plan_stores_codes_and_round_trips(tmp_path):
    spec, plan = _plan_with_codes(np.random.default_rng(0))
    lp = plan.layers[0]
    assert lp.weight_codes is not None and plan.meta["rounding"] == "compensated"
    q0, _ = quantize_weight(spec.weight)
    assert not np.array_equal(lp.int8_weight(spec.weight), q0)
    plan.save(tmp_path / "p.flexiq")
    back = Plan.load(tmp_path / "p.flexiq")
    np.testing.assert_array_equal(back.layers[0].int8_weight(spec.weight), lp.weight_codes)
    # reordering groups (the searches do) keeps the codes
    np.testing.assert_array_equal(back.layers[0].reorder_groups([3, 2, 1, 0]).weight_codes, lp.weight_codes)


def test_plan_codes_mismatch_and_corruption_are_named(tmp_path):
    import json

    spec, plan = _plan_with_codes(np.random.default_rng(1))
    with pytest.raises(PlanError, match="'fc'.*shape"):
        plan.layers[0].int8_weight(np.zeros((8, 15), np.float32))
    doc = json.loads(plan.dumps())
    doc["body"]["layers"][0]["weight_codes"]["int8_zlib_base64"] = "not base64!"
    import hashlib
    canon = json.dumps(doc["body"], sort_keys=True, separators=(",", ":"))
    doc["checksum"] = "sha256:" + hashlib.sha256(canon.encode()).hexdigest()
    with pytest.raises(PlanError, match="'fc': stored INT8 weights are unreadable"):
        Plan.loads(json.dumps(doc), source="edited.flexiq")


def test_version_1_plans_still_load():
    _, plan = _plan_with_codes(np.random.default_rng(2))
    plan.layers[0].weight_codes = None
    plan.version = 1
    back = Plan.loads(plan.dumps())
    assert back.version == 1 and back.layers[0].weight_codes is None
