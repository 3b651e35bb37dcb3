"""The FlexiQ math in numpy: extraction, the strict-subset property, the reference executor, plans."""
import json

import numpy as np
import pytest

from flexiq_tvm.quant import (LayerSpec, Plan, PlanError, TensorStats, bitlen, build_plan, conv2d_int, dense_int,
                              four_bit_code, lower, quantize_activation, quantize_weight)
from flexiq_tvm.quant.reference import LayerReference


def test_bitlen_and_shift_ranges():
    assert bitlen([0, 1, 2, 3, 7, 8, 127, 128, 255]).tolist() == [0, 1, 2, 2, 3, 4, 7, 8, 8]


@pytest.mark.parametrize("unsigned", [False, True])
def test_strict_subset_every_lowered_code_is_an_int8_code(unsigned):
    lo, hi = (0, 255) if unsigned else (-127, 127)
    q = np.arange(lo, hi + 1)
    for e in range(5):
        v = lower(q, e, unsigned)
        assert v.min() >= -128 and v.max() <= 255 if unsigned else 127
        assert np.all(v % (1 << e) == 0)
        # a value that already fits the 4-bit window at this shift is kept exactly
        fits = (q % (1 << e) == 0) & (q >> e >= (0 if unsigned else -8)) & (q >> e <= (15 if unsigned else 7))
        assert np.array_equal(v[fits], q[fits])
        # rounding error is at most half a step, except where the code saturates
        sat = np.abs(four_bit_code(q, e, unsigned)) >= (15 if unsigned else 7)
        assert np.all(np.abs(v - q)[~sat] <= (1 << e) // 2)


def test_rounding_is_half_up_with_arithmetic_shift():
    assert four_bit_code([-3, -2, -1, 1, 2, 3], 1, False).tolist() == [-1, -1, 0, 1, 1, 2]


def test_activation_quantization_rounds_half_up_in_float32():
    x = np.array([0.5, 1.5, -0.5, -1.5, 300.0, -300.0], np.float32)
    assert quantize_activation(x, np.float32(1.0), False).tolist() == [1, 2, 0, -1, 127, -127]
    assert quantize_activation(x, np.float32(1.0), True).tolist() == [1, 2, 0, 0, 255, 0]


def test_weight_quantization_per_output_channel():
    w = np.array([[1.0, -2.0], [0.0, 0.0], [0.5, 0.25]], np.float32)
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and q[0].tolist() == [64, -127] and q[1].tolist() == [0, 0]
    assert np.allclose(s, [2 / 127, 1.0, 0.5 / 127])


def _naive_conv(x, w, stride, pad, dil, groups):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    OH = (H + 2 * pad - dil * (KH - 1) - 1) // stride + 1
    OW = (W + 2 * pad - dil * (KW - 1) - 1) // stride + 1
    out = np.zeros((N, O, OH, OW), np.int64)
    for n in range(N):
        for o in range(O):
            g = o // (O // groups)
            for i in range(OH):
                for j in range(OW):
                    patch = xp[n, g * Cg:(g + 1) * Cg, i * stride: i * stride + dil * (KH - 1) + 1: dil,
                               j * stride: j * stride + dil * (KW - 1) + 1: dil]
                    out[n, o, i, j] = int((patch.astype(np.int64) * w[o].astype(np.int64)).sum())
    return out


@pytest.mark.parametrize("stride,pad,dil,groups", [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 4), (2, 1, 1, 8)])
def test_conv2d_int_matches_loops(stride, pad, dil, groups):
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, (2, 8, 7, 6))
    w = rng.integers(-127, 128, (8, 8 // groups, 3, 3))
    assert np.array_equal(conv2d_int(x, w, (stride, stride), (pad,) * 4, (dil, dil), groups),
                          _naive_conv(x, w, stride, pad, dil, groups))


def _stats(x, axis):
    red = tuple(i for i in range(x.ndim) if i != axis)
    return TensorStats(channel_absmax=np.abs(x).max(axis=red), channel_sqmean=(x.astype(np.float64) ** 2).mean(axis=red),
                       minimum=float(x.min()), maximum=float(x.max()), sample=x.ravel()[:5000], count=x.shape[0])


def _random_conv(rng, groups=1, unsigned=False, C=16, O=8):
    w = rng.standard_normal((O, C // groups, 3, 3)).astype(np.float32) * rng.uniform(0.05, 2, (1, C // groups, 1, 1))
    x = rng.standard_normal((3, C, 6, 6)).astype(np.float32) * rng.uniform(0.01, 3, (1, C, 1, 1)).astype(np.float32)
    if unsigned:
        x = np.maximum(x, 0)
    spec = LayerSpec("conv", "conv2d", w, rng.standard_normal(O).astype(np.float32), (C, 6, 6), (O, 6, 6),
                     groups=groups, padding=(1, 1, 1, 1), act_unsigned=unsigned)
    return spec, x


def _dynamic_shifts_by_hand(qx, rank, n_groups, unsigned, channel_axis):
    """Per (sample, group) shift from the live codes, with Python ints (independent of the library)."""
    qc = np.moveaxis(np.asarray(qx, np.int64), channel_axis, -1)
    N = qc.shape[0]
    qc = qc.reshape(N, -1, qc.shape[-1])
    e = np.zeros((N, n_groups), np.int64)
    for n in range(N):
        for g in range(n_groups):
            m = int(np.abs(qc[n][:, rank == g]).max())
            e[n, g] = min(max(m.bit_length() - (4 if unsigned else 3), 0), 4)
    return e


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("groups,unsigned,gs", [(1, False, 4), (2, True, 8), (16, True, 1), (4, False, 16)])
def test_literal_reference_equals_single_int8_reduction_over_lowered_operands(groups, unsigned, gs, dynamic):
    """The identity the compiled kernels rely on, checked independently in numpy (dynamic: the
    activation shifts come from each sample's live codes)."""
    rng = np.random.default_rng(groups)
    O = 16 if groups == 16 else 8
    spec, x = _random_conv(rng, groups, unsigned, O=O)
    plan = build_plan([spec], [_stats(x, 1)], group_size=gs, calibrator="max")
    ref = LayerReference(spec, plan.layers[0], dynamic=dynamic)
    lp = plan.layers[0]
    qx = ref.quantize_input(x)
    if dynamic:
        e_n = _dynamic_shifts_by_hand(qx, lp.rank, lp.n_groups, unsigned, 1)        # (N, n_groups)
        e_x = e_n[:, lp.rank][:, :, None, None]                                     # (N, C, 1, 1)
        assert np.array_equal(ref.activation_shifts(qx), e_n)
        assert ref.activation_shifts(qx).shape == (x.shape[0], lp.n_groups)
        assert ref.activation_shifts(qx, dynamic=False).shape == (lp.n_groups,)
    else:
        e_x = lp.act_shift_per_channel[None, :, None, None]
    for k in range(lp.n_groups + 1):
        low = lp.rank < k
        xl = np.where(low[None, :, None, None], lower(qx, e_x, unsigned), qx)
        chan = spec.weight_input_channel()
        ew = lp.weight_shift[np.arange(spec.out_channels)[:, None], lp.rank[chan]][:, :, None, None]
        wl = np.where(low[chan][:, :, None, None], lower(ref.q_w, ew, False), ref.q_w)
        assert np.abs(wl).max() <= 128 and np.abs(xl).max() <= 255
        expect = conv2d_int(xl, wl, spec.strides, spec.padding, spec.dilation, groups)
        assert np.array_equal(ref.accumulate(x, k), expect), k
    # ratio 0 is plain INT8
    assert np.array_equal(ref.accumulate(x, 0), conv2d_int(qx, ref.q_w, (1, 1), (1, 1, 1, 1), (1, 1), groups))


def test_lowering_error_grows_with_count_on_average():
    rng = np.random.default_rng(3)
    spec, x = _random_conv(rng, 1, True, C=32, O=16)
    plan = build_plan([spec], [_stats(x, 1)], group_size=8, calibrator="max")
    ref = LayerReference(spec, plan.layers[0])
    exact = ref.forward(x, 0)
    errs = [float(np.mean((ref.forward(x, k) - exact) ** 2)) for k in range(plan.layers[0].n_groups + 1)]
    assert errs[0] == 0 and errs[-1] > errs[1] > 0


def test_dense_reference_3d_tokens():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 32)).astype(np.float32)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    spec = LayerSpec("fc", "dense", w, None, (5, 32), (5, 12))
    plan = build_plan([spec], [_stats(x, 2)], group_size=8, calibrator="percentile")
    ref = LayerReference(spec, plan.layers[0])
    qx = ref.quantize_input(x)
    assert np.array_equal(ref.accumulate(x, 0), dense_int(qx, ref.q_w))
    y = ref.forward(x, 4)
    assert y.shape == (2, 5, 12) and np.corrcoef(y.ravel(), (x @ w.T).ravel())[0, 1] > 0.95


def test_dynamic_shifts_are_per_sample_and_batch_independent():
    rng = np.random.default_rng(7)
    spec, x = _random_conv(rng, 1, True, C=16, O=8)
    plan = build_plan([spec], [_stats(x, 1)], group_size=4, calibrator="max")
    lp = plan.layers[0]
    ref = LayerReference(spec, lp, dynamic=True)
    k = lp.n_groups
    full = ref.accumulate(x, k)
    for n in range(x.shape[0]):
        assert np.array_equal(ref.accumulate(x[n:n + 1], k)[0], full[n])
    # a louder neighbour changes nothing for sample 0; dynamic differs from static somewhere
    x2 = x.copy()
    x2[1:] *= 50
    assert np.array_equal(ref.accumulate(x2, k)[0], full[0])
    assert not np.array_equal(ref.accumulate(x, k, dynamic=False), full)
    assert np.array_equal(ref.accumulate(x, 0), ref.accumulate(x, 0, dynamic=False))


@pytest.mark.parametrize("unsigned", [False, True])
def test_dense_reference_3d_tokens_dynamic(unsigned):
    """Dense over (batch, tokens, C): a sample's max runs over all its tokens."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 32)).astype(np.float32)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32) * rng.uniform(0.05, 3, 32).astype(np.float32)
    x[1] *= 0.1
    if unsigned:
        x = np.abs(x)
    spec = LayerSpec("fc", "dense", w, None, (5, 32), (5, 12), act_unsigned=unsigned)
    plan = build_plan([spec], [_stats(x, 2)], group_size=8, calibrator="max")
    lp = plan.layers[0]
    ref = LayerReference(spec, lp, dynamic=True)
    qx = ref.quantize_input(x)
    e_n = _dynamic_shifts_by_hand(qx, lp.rank, lp.n_groups, unsigned, 2)
    assert np.array_equal(ref.activation_shifts(qx), e_n)
    assert len({tuple(r) for r in e_n}) > 1          # the quiet sample gets other shifts
    for k in range(lp.n_groups + 1):
        low = lp.rank < k
        xl = np.where(low[None, None, :], lower(qx, e_n[:, lp.rank][:, None, :], unsigned), qx)
        chan = spec.weight_input_channel()
        ew = lp.weight_shift[np.arange(12)[:, None], lp.rank[chan]]
        wl = np.where(low[chan], lower(ref.q_w, ew, False), ref.q_w)
        assert np.array_equal(ref.accumulate(x, k), dense_int(xl, wl)), k


def _two_layer_plan(rng):
    s1, x1 = _random_conv(rng, 1, False, C=16, O=32)
    w2 = rng.standard_normal((10, 32)).astype(np.float32)
    s2 = LayerSpec("fc", "dense", w2, None, (32,), (10,), act_unsigned=True)
    x2 = np.abs(rng.standard_normal((3, 32))).astype(np.float32)
    return [s1, s2], [_stats(x1, 1), _stats(x2, 1)]


def test_plan_levels_nested_and_mac_share():
    rng = np.random.default_rng(2)
    specs, stats = _two_layer_plan(rng)
    plan = build_plan(specs, stats, group_size=8)
    counts = [plan.counts_for_ratio(r) for r in (0, 0.25, 0.5, 0.75, 1.0)]
    assert counts[0].tolist() == [0, 0] and counts[-1].tolist() == [2, 4]
    for a, b in zip(counts, counts[1:]):
        assert np.all(a <= b)
    assert plan.mac_ratio(counts[-1]) == 1.0
    for r, c in zip((0.25, 0.5, 0.75), counts[1:-1]):
        assert abs(plan.mac_ratio(c) - r) < 0.3
    # any prefix of the schedule is reachable and its share is monotone
    assert np.all(np.diff(plan.mac_share) > 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plan.counts_for_ratio(1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plan.counts_for_ratio(float("nan"))


def test_plan_roundtrip_and_bad_files(tmp_path):
    rng = np.random.default_rng(2)
    specs, stats = _two_layer_plan(rng)
    plan = build_plan(specs, stats, group_size=8)
    p = tmp_path / "m.flexiq"
    plan.save(p)
    back = Plan.load(p)
    assert back.dumps() == plan.dumps()
    assert back.dynamic is False and json.loads(p.read_text())["body"]["dynamic"] is False
    # the dynamic flag is saved, checksummed, and defaults to False when absent
    plan.dynamic = True
    plan.save(tmp_path / "dyn.flexiq")
    assert Plan.load(tmp_path / "dyn.flexiq").dynamic is True
    ddoc = json.loads((tmp_path / "dyn.flexiq").read_text())
    ddoc["body"]["dynamic"] = False
    (tmp_path / "dyn_edit.flexiq").write_text(json.dumps(ddoc))
    with pytest.raises(PlanError, match="corrupted"):
        Plan.load(tmp_path / "dyn_edit.flexiq")
    del ddoc["body"]["dynamic"]
    import hashlib
    canon = json.dumps(ddoc["body"], sort_keys=True, separators=(",", ":"))
    ddoc["checksum"] = "sha256:" + hashlib.sha256(canon.encode()).hexdigest()
    (tmp_path / "old.flexiq").write_text(json.dumps(ddoc))
    assert Plan.load(tmp_path / "old.flexiq").dynamic is False
    plan.dynamic = False
    assert np.array_equal(back.layers[0].weight_shift, plan.layers[0].weight_shift)
    text = p.read_text()
    (tmp_path / "trunc.flexiq").write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match="trunc.flexiq.*unreadable"):
        Plan.load(tmp_path / "trunc.flexiq")
    doc = json.loads(text)
    doc["body"]["layers"][0]["act_scale"] *= 2
    (tmp_path / "edit.flexiq").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="corrupted"):
        Plan.load(tmp_path / "edit.flexiq")
    doc = json.loads(text)
    doc["version"] = 99
    (tmp_path / "new.flexiq").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="newer"):
        Plan.load(tmp_path / "new.flexiq")
    with pytest.raises(PlanError, match="fingerprint"):
        specs[0].weight[0, 0, 0, 0] += 1
        from flexiq_tvm.quant import model_fingerprint
        back.check_model(model_fingerprint(specs), [s.name for s in specs])


def test_build_plan_is_deterministic():
    rng = np.random.default_rng(4)
    specs, stats = _two_layer_plan(rng)
    assert build_plan(specs, stats, seed=1).dumps() == build_plan(specs, stats, seed=1).dumps()


def test_greedy_steps_of_a_mac_share_cover_every_group_with_fewer_evaluations():
    from flexiq_tvm.quant.search import greedy_schedule

    rng = np.random.default_rng(0)
    macs = [rng.integers(1, 50, size=n).astype(np.float64) for n in (40, 25, 60, 3)]
    weight = np.array([4.0, 1.0, 2.0, 8.0])

    def run(step_share):
        calls = []

        def evaluate(counts):          # error grows with the MACs lowered, per layer at its own rate
            calls.append(1)
            return float(sum(w * m[:k].sum() ** 1.5 for w, m, k in zip(weight, macs, counts)))
        return greedy_schedule(macs, evaluate, step_share=step_share), len(calls)

    fine, n_fine = run(0.0)
    coarse, n_coarse = run(0.05)
    for sched in (fine, coarse):
        assert np.bincount(sched, minlength=4).tolist() == [len(m) for m in macs]
    assert n_coarse < n_fine / 3
    # a step is the shortest run of a layer's next groups that reaches the share (or its last groups)
    from flexiq_tvm.quant.search import _chunk
    m = np.array([1.0, 1.0, 5.0, 1.0, 1.0])
    assert [_chunk(m, 0, 2.0), _chunk(m, 1, 2.0), _chunk(m, 3, 10.0), _chunk(m, 0, 0.0)] == [2, 2, 2, 1]
    # the cheapest layer (weight 1) is lowered first in both
    assert fine[0] == 1 and coarse[0] == 1
