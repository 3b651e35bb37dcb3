"""Per-ratio bias correction: stored in the plan, compiled as bias rows, selected by set_ratio."""
import numpy as np
import tvm

import flexiq_tvm as fq
from flexiq_tvm.api import compile_with_taps
from flexiq_tvm.quant.reference import LayerReference


def _model(graph, tmp_path):
    g = graph((3, 9, 9), seed=41)
    g.conv(3, 16, 3, 1, 1)
    g.relu()
    g.conv(16, 16, 3, 2, 1, groups=16)
    g.relu()
    g.gap()
    g.flatten()
    g.gemm(16, 5)
    return fq.load_model(g.save(tmp_path / "r.onnx"))


def test_bias_rows_bit_exact_and_selected_by_ratio(graph, tmp_path):
    model = _model(graph, tmp_path)
    calib = np.random.default_rng(0).standard_normal((64, 3, 9, 9)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=True, search_samples=64, progress=False)
    assert sorted(plan.bias_correction) == [0.25, 0.5, 0.75, 1.0]
    assert any(np.abs(d).max() > 0 for d in plan.bias_correction[1.0])
    back = fq.Plan.loads(plan.dumps())
    assert all(np.array_equal(a, b) for a, b in zip(back.bias_correction[0.5], plan.bias_correction[0.5]))

    vm = compile_with_taps(model, plan, batch_size=2)
    levels = sorted(plan.bias_correction)
    for r in (0.0, 0.5, 1.0):
        counts = plan.counts_for_ratio(r)
        row = plan.bias_row(r)
        assert row == (levels.index(r) + 1 if r in levels else 0)
        outs = vm["main"](tvm.runtime.tensor(calib[:2]), tvm.runtime.tensor(counts),
                          tvm.runtime.tensor(np.array([row], np.int32)))
        for i, (spec, lp) in enumerate(zip(model.specs, plan.layers)):
            ref = LayerReference(spec, lp)
            if row:
                ref.bias = (spec.bias - plan.bias_correction[r][i]).astype(np.float32)
            assert np.array_equal(outs[2 + 2 * i].numpy(), ref.forward(outs[1 + 2 * i].numpy(), counts[i]))

    cm = fq.compile(model, plan, batch_size=4)
    cm.set_ratio(1.0)
    corrected = cm(calib[:4])
    cm.set_counts(plan.counts_for_ratio(1.0))          # explicit counts: no correction
    raw = cm(calib[:4])
    assert not np.array_equal(corrected, raw)
    cm.set_ratio(1.0)
    assert np.array_equal(cm(calib[:4]), corrected)


def test_recovery_brings_outputs_closer_to_int8(graph, tmp_path):
    model = _model(graph, tmp_path)
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((128, 3, 9, 9)).astype(np.float32)
    held_out = rng.standard_normal((64, 3, 9, 9)).astype(np.float32)
    plain = fq.quantize(model, calib, group_size=8, search="range", recover=False, progress=False)
    fixed = fq.quantize(model, calib, group_size=8, search="range", recover=True, progress=False)
    a, b = fq.compile(model, plain, batch_size=64), fq.compile(model, fixed, batch_size=64)
    a.set_ratio(0.0)
    int8 = a(held_out)
    a.set_ratio(1.0)
    b.set_ratio(1.0)
    bias_err = lambda y: float(np.abs((y - int8).mean(axis=0)).mean())  # noqa: E731
    assert bias_err(b(held_out)) < bias_err(a(held_out))
