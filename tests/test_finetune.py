"""Finetuning (flexiq_tvm/finetune): one set of INT8 codes for every level, still an ordinary plan."""
import builtins
import os
import sys

import numpy as np
import pytest
import tvm

import flexiq_tvm as fq
from flexiq_tvm.api import compile_with_taps
from flexiq_tvm.errors import FlexiQError
from flexiq_tvm.quant.reference import LayerReference

import torch  # noqa: E402  (the test extra installs it: a missing torch fails here, not skips)

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flexiq_tvm", "assets")


@pytest.fixture(scope="module")
def demo():
    """The shipped demo CNN, a quick plan (range search, bias correction) and its finetuned copy."""
    from flexiq_tvm.search.finetune import FinetuneConfig, finetune_plan

    torch.set_num_threads(1)
    model = fq.load_model(os.path.join(ASSETS, "fashion_cnn.onnx"))
    calib = np.load(os.path.join(ASSETS, "fashion_calib.npz"))["inputs"][:160].astype(np.float32)
    plan = fq.quantize(model, calib, search="range", search_samples=64, progress=False)
    cfg = FinetuneConfig(method="block", epochs=2, holdout=0.25, augment=False, seed=0)
    tuned = finetune_plan(model, plan, calib, cfg, progress=False)
    return model, calib, plan, tuned


def test_heldout_loss_tracked_and_lowered_at_half(demo):
    model, calib, plan, tuned = demo
    rep = tuned.meta["finetune"]
    assert rep["kept"] and rep["heldout_samples"] == 40 and rep["train_samples"] == 120
    # keep_int8 (default): a kept plan is not worse at INT8 on the held-out inputs
    assert not rep["int8_worse"] and rep["heldout_after"][0.0] <= 1.1 * rep["heldout_before"][0.0]
    assert set(rep["heldout_before"]) == set(rep["heldout_after"]) == set(plan.levels)
    assert all(b["steps"] >= 1 and set(b["heldout_before"]) == set(plan.levels) for b in rep["blocks"])
    # the distillation loss at ratio 0.5 on the held-out inputs, recomputed independently of the report
    from flexiq_tvm.search.finetune.qmodel import QuantModel
    from flexiq_tvm.search.finetune.trainer import _split, heldout_kl

    _, hold = _split(calib.shape[0], 0.25, 0)
    x = torch.tensor(calib[hold])
    with torch.no_grad():
        t = QuantModel(model, plan).teacher(x)
    before = heldout_kl(QuantModel(model, plan), x, t, [0.5])[0.5]
    after = heldout_kl(QuantModel(model, tuned), x, t, [0.5])[0.5]
    assert after < before
    assert abs(after - rep["heldout_after"][0.5]) < 1e-6


def test_finetuned_plan_is_an_ordinary_plan(demo, tmp_path):
    model, calib, plan, tuned = demo
    changed = 0
    for a, b in zip(plan.layers, tuned.layers):
        spec_w = next(s.weight for s in model.specs if s.name == a.name)
        codes = b.int8_weight(spec_w)
        assert codes.dtype == np.int8 and codes.shape == spec_w.shape
        assert codes.min() >= -127 and codes.max() <= 127
        changed += int(np.sum(codes != a.int8_weight(spec_w)))
        # nesting untouched: the same orders, groups and shift tables
        assert np.array_equal(a.order, b.order) and a.group_sizes == b.group_sizes
        assert np.array_equal(a.act_shift, b.act_shift) and np.array_equal(a.weight_shift, b.weight_shift)
    assert changed > 0
    assert tuned.levels == plan.levels and tuned.schedule == plan.schedule
    path = tmp_path / "tuned.plan.json"
    tuned.save(path)
    back = fq.Plan.load(path)
    for a, b in zip(back.layers, tuned.layers):
        assert np.array_equal(a.weight_codes, b.weight_codes) and np.array_equal(a.weight_scale, b.weight_scale)
    assert sorted(back.bias_correction) == sorted(tuned.bias_correction)


def test_torch_model_matches_numpy_reference_exactly(demo):
    model, calib, plan, tuned = demo
    from flexiq_tvm.search.finetune.qmodel import check_against_reference

    res = check_against_reference(model, tuned, calib[:3])
    assert res["checked"] == len(tuned.levels) * tuned.num_layers
    assert res["max_abs_diff"] == 0


def test_compiled_artifact_bit_exact_with_reference_after_finetuning(demo):
    model, calib, plan, tuned = demo
    vm = compile_with_taps(model, tuned, batch_size=2)
    levels = sorted(tuned.bias_correction)
    for r in sorted(tuned.levels):
        counts = tuned.counts_for_ratio(r)
        row = tuned.bias_row(r)
        outs = vm["main"](tvm.runtime.tensor(calib[:2]), tvm.runtime.tensor(counts),
                          tvm.runtime.tensor(np.array([row], np.int32)))
        for i, (spec, lp) in enumerate(zip(model.specs, tuned.layers)):
            ref = LayerReference(spec, lp)
            if row:
                ref.bias = (spec.bias - tuned.bias_correction[levels[row - 1]][i]).astype(np.float32)
            assert np.array_equal(outs[2 + 2 * i].numpy(), ref.forward(outs[1 + 2 * i].numpy(), counts[i])), (r, i)


def test_finetune_without_torch_names_the_extra(demo, monkeypatch, tmp_path):
    model, calib, plan, tuned = demo
    tuned.save(tmp_path / "tuned.plan.json")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    for mod in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        monkeypatch.delitem(sys.modules, mod)
    model = fq.load_model(os.path.join(ASSETS, "fashion_cnn.onnx"), check=False)
    with pytest.raises(FlexiQError, match=r"pip install 'flexiq-tvm\[torch\]'"):
        fq.quantize(model, os.path.join(ASSETS, "fashion_calib.npz"), search="range", finetune=True, progress=False)
    # without finetuning the INT8 plan path does not need torch
    plan = fq.quantize(model, np.load(os.path.join(ASSETS, "fashion_calib.npz"))["inputs"][:32], search="range",
                       recover=False, progress=False)
    assert plan.num_layers == 10
    # a finetuned plan loads, compiles and runs without torch, and matches the numpy reference
    back = fq.Plan.load(tmp_path / "tuned.plan.json")
    assert "torch" not in sys.modules
    cm = fq.compile(model, back, batch_size=2)
    cm.set_ratio(0.5)
    y = cm(calib[:2])
    from flexiq_tvm.report.reference_model import build_onnx_reference

    no_bias = fq.Plan.loads(back.dumps())
    no_bias.bias_correction = {}
    ref = build_onnx_reference(os.path.join(ASSETS, "fashion_cnn.onnx"), model, no_bias)
    cm_raw = fq.compile(model, no_bias, batch_size=2)
    cm_raw.set_ratio(0.5)
    np.testing.assert_allclose(cm_raw(calib[:2]), ref(calib[:2], no_bias.counts_for_ratio(0.5)), rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 10)


def test_heldout_split_keeps_photos_together():
    """Crops `<photo>_<NN>` of one photo are held out (or trained on) together."""
    from types import SimpleNamespace

    from flexiq_tvm.search.finetune.trainer import _split_groups, source_groups

    files = [f"/c/{p}_{k:02d}.png" for p in ("astronaut", "coffee", "motorcycle_left", "retina") for k in range(3)]
    groups = source_groups(SimpleNamespace(files=files), len(files))
    assert groups is not None and len(set(groups.tolist())) == 4
    train, hold = _split_groups(groups, 0.25, 0)
    assert len(hold) == 3 and not set(groups[train]) & set(groups[hold])
    assert source_groups(np.zeros((12, 1)), 12) is None       # an array: crop-level split


def test_holdout_by_source_on_an_array_says_so(demo):
    """Asked to hold out whole photos of data that has no photo names: a warning, a crop-level split."""
    from flexiq_tvm.search.finetune import FinetuneConfig, finetune_plan

    model, calib, plan, _ = demo
    with pytest.warns(UserWarning, match="holdout_by_source"):
        tuned = finetune_plan(model, plan, calib[:40], FinetuneConfig(epochs=1, holdout=0.25, holdout_by_source=True),
                              progress=False)
    rep = tuned.meta["finetune"]
    assert rep["heldout_samples"] == 10 and not rep["heldout_by_source"]


def test_finetune_options_keep_an_exact_plan(demo):
    """Bounded codes, augmented copies, learned activation scales and a final end-to-end phase:
    the codes stay within code_radius and the torch model still matches the reference exactly."""
    from flexiq_tvm.search.finetune import FinetuneConfig, finetune_plan
    from flexiq_tvm.search.finetune.qmodel import check_against_reference

    model, calib, plan, _ = demo
    cfg = FinetuneConfig(method="block", rounding="ste", epochs=1, holdout=0.25, seed=0, code_radius=1.0, train_copies=2,
                         ascale_lr=1e-3, final_epochs=1, level_power=0.5)
    tuned = finetune_plan(model, plan, calib, cfg, progress=False)
    rep = tuned.meta["finetune"]
    assert rep["train_samples"] == 120 and "final" in rep and "after_blocks" in rep
    if rep["kept"]:
        for a, b, spec in zip(plan.layers, tuned.layers, model.specs):
            diff = b.int8_weight(spec.weight).astype(int) - a.int8_weight(spec.weight).astype(int)
            assert np.abs(diff).max() <= 1
    assert check_against_reference(model, tuned, calib[:3])["max_abs_diff"] == 0


def test_finetune_config_errors():
    with pytest.raises(ValueError, match="method"):
        fq.FinetuneConfig(method="layer")
    with pytest.raises(ValueError, match="holdout"):
        fq.FinetuneConfig(holdout=1.0)
    with pytest.raises(ValueError, match="train_copies"):
        fq.FinetuneConfig(train_copies=0)
    with pytest.raises(ValueError, match="code_radius"):
        fq.FinetuneConfig(code_radius=0)
    with pytest.raises(ValueError, match="rounding must be one of"):
        fq.FinetuneConfig(rounding="adaround")
    with pytest.raises(ValueError, match="needs method='block'"):
        fq.FinetuneConfig(rounding="learned", method="model")
    with pytest.raises(ValueError, match="round_steps"):
        fq.FinetuneConfig(round_steps=-1)
    with pytest.raises(ValueError, match="code_radius bounds"):
        fq.FinetuneConfig(code_radius=1.0)
    assert fq.FinetuneConfig().rounding == "learned" and fq.FinetuneConfig(method="model").rounding == "ste"
    with pytest.raises(TypeError, match="finetune must be"):
        from flexiq_tvm.search.finetune.config import as_config

        as_config("yes")


def test_cli_epochs_need_finetune(tmp_path):
    from flexiq_tvm.cli import main

    with pytest.raises(SystemExit, match="need --finetune"):
        main(["quantize", os.path.join(ASSETS, "fashion_cnn.onnx"), "--calib", os.path.join(ASSETS, "fashion_calib.npz"),
              "-o", str(tmp_path / "p.json"), "--epochs", "3"])


def test_cli_finetune_flags_map_to_the_rounding_they_train():
    from types import SimpleNamespace

    from flexiq_tvm.cli import _finetune_config

    base = dict(finetune=True, seed=3, epochs=None, lr=None, finetune_method=None, finetune_rounding=None, steps=None)
    cfg = _finetune_config(SimpleNamespace(**{**base, "lr": 0.02, "steps": 7}))
    assert (cfg.rounding, cfg.round_lr, cfg.round_steps, cfg.seed) == ("learned", 0.02, 7, 3)
    cfg = _finetune_config(SimpleNamespace(**{**base, "lr": 0.2, "finetune_rounding": "ste", "epochs": 2}))
    assert (cfg.rounding, cfg.lr, cfg.epochs) == ("ste", 0.2, 2)
    assert _finetune_config(SimpleNamespace(**{**base, "finetune_method": "model"})).rounding == "ste"


def test_learned_rounding_flips_4bit_codes_and_keeps_int8_codes_in_their_bucket(demo):
    """rounding="learned" (AdaRound on the 4-bit codes): a weight's INT8 code changes only where its
    4-bit code flipped, by one 4-bit step, and then to the code nearest the old one that has the new
    4-bit code; the plan still matches the reference exactly. Checked with numpy's bit extraction."""
    from flexiq_tvm.quant.bitextract import four_bit_code
    from flexiq_tvm.search.finetune import FinetuneConfig, finetune_plan
    from flexiq_tvm.search.finetune.qmodel import check_against_reference

    model, calib, plan, _ = demo
    cfg = FinetuneConfig(method="block", rounding="learned", round_steps=100, ascale_lr=1e-3, holdout=0.25,
                         seed=0, augment=False)
    tuned = finetune_plan(model, plan, calib, cfg, progress=False)
    rep = tuned.meta["finetune"]
    assert rep["kept"] and rep["heldout_after"][0.5] < rep["heldout_before"][0.5]
    flipped = 0
    for a, b, spec in zip(plan.layers, tuned.layers, model.specs):
        old, new = a.int8_weight(spec.weight).astype(np.int64), b.int8_weight(spec.weight).astype(np.int64)
        ew = np.take_along_axis(a.weight_shift, a.rank[spec.weight_input_channel()], axis=1)
        e = ew.reshape(ew.shape + (1,) * (old.ndim - 2)) * np.ones_like(old)
        c_old, c_new = four_bit_code(old, e, False), four_bit_code(new, e, False)
        same = c_old == c_new
        assert np.array_equal(old[same], new[same])
        assert np.abs(c_new - c_old).max() <= 1
        # a flipped code sits at the edge of its new bucket nearest the old code
        f = ~same
        flipped += int(f.sum())
        for o, n_, ee, cn in zip(old[f], new[f], e[f], c_new[f]):
            cands = np.arange(-127, 128)
            ok = cands[four_bit_code(cands, np.full_like(cands, ee), False) == cn]
            assert n_ == ok[np.argmin(np.abs(ok - o))]
    assert flipped > 0
    assert check_against_reference(model, tuned, calib[:3])["max_abs_diff"] == 0


def test_torch_graph_reuses_its_constants_across_forward_passes():
    """Each traversal of the Relax graph wraps the same constant nodes in new Python objects; the
    constant cache is keyed by node, so repeated forward passes (thousands in a finetuning run) do
    not grow it (it grew by one copy per constant per pass: MobileNetV2 ran out of 24 GiB)."""
    from flexiq_tvm.search.finetune.graph import RelaxTorchGraph

    model = fq.load_model(os.path.join(ASSETS, "fashion_vit.onnx"))   # layer norms, positions: constants
    graph = RelaxTorchGraph(model)
    specs = model.specs

    def float_layer(i, x):
        w, b = torch.tensor(specs[i].weight), torch.tensor(specs[i].bias)
        if specs[i].op == "conv2d":
            return torch.nn.functional.conv2d(x, w, b, specs[i].strides)
        return x @ w.t() + b

    x = torch.tensor(np.load(os.path.join(ASSETS, "fashion_calib.npz"))["inputs"][:2].astype(np.float32))
    with torch.no_grad():
        first = graph.run(x, float_layer)
        n = len(graph._consts)
        for _ in range(3):
            again = graph.run(x, float_layer)
    assert n > 0 and len(graph._consts) == n
    assert torch.equal(first, again)
