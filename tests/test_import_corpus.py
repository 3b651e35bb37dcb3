"""A user's own model on the first try: torch modules written the way users write them, exported the
way users export them (fixed batch 1, fixed batch 4, dynamic batch; opsets 13 and 17), each taken
through load_model -> quantize -> compile -> run. The FP32 import must equal ONNX Runtime (checked by
load_model itself), the INT8 output must stay close to FP32, and the FlexiQ layers bit-exact."""
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.errors import ModelError  # noqa: E402
from flexiq_tvm.quant.plan import PlanError  # noqa: E402
from flexiq_tvm.quant.reference import reference_layers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus_models as corpus  # noqa: E402
from conftest import GraphBuilder, assert_taps_bit_exact, counts_grid  # noqa: E402

MODELS = ["tiny_cnn", "resnetish", "tf_ported", "vit_block", "crnn"]
OPSETS = (13, 17)


def quick_plan(model, x):
    # range search without bias correction: search_samples only sizes plan.meta's per-layer error
    # report (the schedule is the value-range order), so the plan is the one all samples would give
    return fq.quantize(model, x, search="range", recover=False, rounding="nearest", search_samples=2,
                       progress=False)


def rel_err(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def small_classifier(path, classes, act="Relu", **act_attrs):
    """conv -> activation -> global pool -> flatten -> Gemm, 3x8x8 input, written to `path`."""
    g = GraphBuilder((3, 8, 8))
    g.conv(3, 8, 3, 1, 1)
    g.node(act, [g.cur], **act_attrs)
    g.gap()
    g.flatten()
    g.gemm(8, classes)
    return g.save(path)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


def exported(export_dir, name, mode, opset):
    path = str(export_dir / f"{name}_{mode}_{opset}.onnx")
    if not os.path.exists(path):
        corpus.export(corpus.build(name), corpus.CORPUS[name][1], path, mode, opset)
    return path


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("mode", corpus.BATCH_MODES)
@pytest.mark.parametrize("name", MODELS)
def test_export_runs_end_to_end(export_dir, name, mode, opset):
    path = exported(export_dir, name, mode, opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fq.load_model(path)
    # checked against ONNX Runtime FP32 at import (it raises on a difference)
    assert model.import_check is not None and model.import_check["max_abs_diff"] < 1e-4
    assert model.fixed_batch is None              # every one of these exports frees its batch
    x = np.random.default_rng(1).standard_normal((40,) + model.input_shape).astype(np.float32)
    plan = quick_plan(model, x)
    cm = fq.compile(model, plan, batch_size=1)
    with torch.no_grad():
        ref = corpus.build(name)(torch.from_numpy(x[:6])).numpy()
    cm.set_ratio(0.0)
    y8 = cm(x[:6])
    assert y8.shape == ref.shape
    assert rel_err(y8, ref) < 0.05, rel_err(y8, ref)
    cm.set_ratio(1.0)
    y4 = cm(x[:6])
    assert np.all(np.isfinite(y4)) and not np.array_equal(y4, y8)
    assert rel_err(y4, ref) < 0.5


@pytest.mark.parametrize("opset", [11, 18])
def test_other_opsets_and_initializers_as_inputs(tmp_path, opset):
    """Opsets 11 and 18, weights listed as graph inputs (older exporters' keep_initializers_as_inputs)."""
    net = corpus.build("resnetish")
    path = str(tmp_path / f"r{opset}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), path, input_names=["x"], output_names=["y"],
                          opset_version=opset, dynamo=False, keep_initializers_as_inputs=True)
        proto = onnx.load(path)
        assert len(proto.graph.input) > 1 and proto.opset_import[0].version == opset
        model = fq.load_model(path)
    assert model.import_check is not None and model.fixed_batch is None
    x = np.random.default_rng(9).standard_normal((24,) + model.input_shape).astype(np.float32)
    cm = fq.compile(model, quick_plan(model, x), batch_size=2)
    with torch.no_grad():
        ref = net(torch.from_numpy(x[:4])).numpy()
    assert rel_err(cm(x[:4]), ref) < 0.05


@pytest.mark.parametrize("name", MODELS + ["pinned_mlp"])
def test_fixed_batch_layers_bit_exact(export_dir, name):
    """Every FlexiQ layer of a fixed-batch-4 export, bit for bit against the numpy reference, at a
    batch the file did not declare (or at the pinned one)."""
    path = exported(export_dir, name, "fixed4", 17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fq.load_model(path)
    x_cal = np.random.default_rng(2).standard_normal((24,) + model.input_shape).astype(np.float32)
    plan = quick_plan(model, x_cal)
    batch = model.batch_for(3)
    vm = fq.api.compile_with_taps(model, plan, batch_size=batch)
    assert_taps_bit_exact(vm, reference_layers(model.specs, plan), x_cal[:batch], counts_grid(plan))


def test_pinned_batch_runs_in_chunks_and_names_the_node(export_dir, caplog):
    path = exported(export_dir, "pinned_mlp", "fixed4", 17)
    caplog.set_level("WARNING", logger="flexiq_tvm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fq.load_model(path)
    assert model.fixed_batch == 4 and "Reshape" in model.pin_reason
    assert any("pins the batch at 4" in r.getMessage() for r in caplog.records)
    x = np.random.default_rng(3).standard_normal((30,) + model.input_shape).astype(np.float32)
    plan = fq.quantize(model, x, progress=False, search_samples=9)    # default search + bias correction
    with pytest.raises(ModelError, match=r"pins the batch at 4 .*Reshape"):
        fq.compile(model, plan, batch_size=1)
    cm = fq.compile(model, plan)                  # the default batch 1 cannot be: error above
    assert cm.batch_size == 4
    with torch.no_grad():
        ref = corpus.build("pinned_mlp")(torch.from_numpy(x[:5])).numpy()
    y = cm(x[:5])                                 # 5 samples: two chunks of 4, the last padded
    assert y.shape == ref.shape and rel_err(y, ref) < 0.05


def test_relax_module_with_a_fixed_batch(tmp_path):
    """A user's own Relax module (from their TVM pipeline) whose main declares batch 3: quantized and
    run in chunks of 3."""
    from tvm.relax.frontend.onnx import from_onnx

    proto = onnx.load(small_classifier(tmp_path / "fixed3.onnx", 5))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    model = fq.load_model(from_onnx(proto))
    assert model.fixed_batch == 3
    x = np.random.default_rng(10).standard_normal((10, 3, 8, 8)).astype(np.float32)
    cm = fq.compile(model, quick_plan(model, x))
    assert cm.batch_size == 3 and cm(x[:4]).shape == (4, 5)
    with pytest.raises(ModelError, match="declares batch 3"):
        fq.compile(model, quick_plan(model, x), batch_size=2)


def test_tiny_fixed_batch_model_every_target_and_reload(export_dir, tmp_path):
    """The issue's bar: conv-BN-ReLU, depthwise, pointwise, residual, pool, Gemm, input [4, 3, 16, 16]:
    quantize -> compile (llvm, npu, cuda sm_80 / sm_90) -> export -> load_artifact, bit-exact after
    reload (llvm, npu); the CUDA artifacts build and export on this machine without a GPU."""
    path = exported(export_dir, "tiny_cnn", "fixed4", 17)
    assert [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim] == [4, 3, 16, 16]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fq.load_model(path)
        x = np.random.default_rng(4).standard_normal((48,) + model.input_shape).astype(np.float32)
        plan = fq.quantize(model, x, progress=False, search_samples=16, recover=False)
        outs = {}
        for target in ("llvm", "npu"):
            cm = fq.compile(model, plan, target=target, batch_size=1)
            so = str(tmp_path / f"{target}.so")
            cm.export(so)
            re = fq.load_artifact(so)
            for r in (0.0, 0.5, 1.0):
                cm.set_ratio(r)
                re.set_ratio(r)
                a, b = cm(x[:3]), re(x[:3])
                assert np.array_equal(a, b), (target, r)
                outs[(target, r)] = a
        for r in (0.0, 0.5, 1.0):
            assert np.array_equal(outs[("llvm", r)], outs[("npu", r)]), r
        for arch in ("sm_80", "sm_90"):
            cm = fq.compile(model, plan, target="cuda", arch=arch, batch_size=1, allow_padded_groups=True)
            cm.set_ratio(0.5)                     # a ratio is set before any device exists
            so = str(tmp_path / f"cuda_{arch}.so")
            cm.export(so)
            assert os.path.getsize(so) > 0


def test_torch_and_onnx_frontends_share_a_plan(export_dir):
    """The dynamic-axes transformer block: one plan, the same outputs through both frontends."""
    path = exported(export_dir, "vit_block", "dynamic", 17)
    net = corpus.build("vit_block")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_onnx = fq.load_model(path)
        from_torch = fq.load_model(net, torch.randn(2, 3, 16, 16))
    assert from_onnx.fingerprint == from_torch.fingerprint
    x = np.random.default_rng(5).standard_normal((32, 3, 16, 16)).astype(np.float32)
    plan = quick_plan(from_onnx, x)
    a, b = fq.compile(from_onnx, plan), fq.compile(from_torch, plan)
    for r in (0.0, 0.5, 1.0):
        a.set_ratio(r)
        b.set_ratio(r)
        assert np.array_equal(a(x[:4]), b(x[:4])), r


def _spatially_dynamic(path):
    net = corpus.build("tiny_cnn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), path, input_names=["x"], output_names=["y"],
                          opset_version=13, dynamo=False, dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    return path


def test_dynamic_spatial_dims_take_input_shape(tmp_path):
    path = _spatially_dynamic(str(tmp_path / "fcn.onnx"))
    with pytest.raises(ModelError, match=r"dynamic dims \(N, 3, \?, \?\).*input_shape=\(3, H, W\)"):
        fq.load_model(path)
    with pytest.raises(ModelError, match="does not fit"):
        fq.load_model(path, input_shape=(1, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fq.load_model(path, input_shape=(3, 20, 12))
    assert model.input_shape == (3, 20, 12)
    x = np.random.default_rng(6).standard_normal((24, 3, 20, 12)).astype(np.float32)
    plan = quick_plan(model, x)
    assert plan.meta["input_shape"] == [3, 20, 12]
    plan_file = str(tmp_path / "fcn.flexiq")
    plan.save(plan_file)
    cm = fq.compile(path, plan_file)              # a path: loaded at the shape the plan records
    assert cm.input_shape == (3, 20, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = fq.load_model(path, input_shape=(3, 16, 16))
    with pytest.raises(PlanError, match=r"input shape \(3, 20, 12\).*\(3, 16, 16\)"):
        fq.compile(other, plan)


def test_cli_input_shape(tmp_path):
    path = _spatially_dynamic(str(tmp_path / "fcn.onnx"))
    calib = str(tmp_path / "calib.npz")
    np.savez(calib, inputs=np.random.default_rng(7).standard_normal((24, 3, 12, 12)).astype(np.float32))
    plan = str(tmp_path / "p.flexiq")
    so = str(tmp_path / "m.so")
    run = lambda *a: subprocess.run([sys.executable, "-m", "flexiq_tvm", *a], capture_output=True, text=True)  # noqa
    r = run("quantize", path, "--calib", calib, "-o", plan, "--search", "range", "--no-recover", "--quiet")
    assert r.returncode == 2 and "--input-shape 3,H,W" in r.stderr and not os.path.exists(plan)
    r = run("quantize", path, "--calib", calib, "-o", plan, "--search", "range", "--no-recover", "--quiet",
            "--input-shape", "3,12,12")
    assert r.returncode == 0, r.stderr
    r = run("compile", path, "--plan", plan, "-o", so, "--input-shape", "3,16,16")
    assert r.returncode == 2 and "input shape (3, 12, 12)" in r.stderr and not os.path.exists(so)
    r = run("compile", path, "--plan", plan, "-o", so)         # the plan's shape
    assert r.returncode == 0, r.stderr
    cm = fq.load_artifact(so)
    assert cm.input_shape == (3, 12, 12)


def test_unimportable_node_is_named(tmp_path):
    """An op TVM 0.27 cannot import (Celu): the error names the file, the op and the node, and says
    what ONNX Runtime makes of the file."""
    path = small_classifier(tmp_path / "celu.onnx", 4, act="Celu", alpha=1.0)
    with pytest.raises(ModelError) as e:
        fq.load_model(path)
    msg = str(e.value)
    assert "celu.onnx" in msg and "ONNX Runtime runs the file" in msg
    assert re.search(r"at Celu node 'celu\d+'", msg), msg


def test_import_that_changes_the_function_is_refused(tmp_path, monkeypatch):
    """The ONNX Runtime check compares outputs: a module that computes something else is an error
    naming the output (here TVM gets a copy of the file whose Gemm bias was altered)."""
    from flexiq_tvm.frontend import onnx_import

    path = small_classifier(tmp_path / "m.onnx", 4)
    real = onnx_import.to_relax

    def altered(proto, where):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        b = next(i for i in p.graph.initializer if i.name == p.graph.node[-1].input[2])
        arr = onnx.numpy_helper.to_array(b) + 1.0
        b.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), b.name))
        return real(p, where)

    monkeypatch.setattr(onnx_import, "to_relax", altered)
    with pytest.raises(ModelError, match=r"changes the model's function: output 'gemm\d+' differs"):
        fq.load_model(path)


@pytest.fixture(scope="module")
def ocr_models():
    """PP-OCR models from the rapidocr-onnxruntime wheel (fetched once into the user cache); the test
    skips only when the package registry cannot be reached."""
    cache = os.path.join(os.path.expanduser("~"), ".cache", "flexiq_tvm", "ppocr")
    d = corpus.fetch_ppocr(cache)
    if d is None:
        pytest.skip(f"{corpus.PPOCR_WHEEL} could not be downloaded here (no package registry)")
    return d


@pytest.mark.parametrize("which,shape", [("cls", (3, 48, 192)), ("rec", (3, 48, 160))])
def test_ppocr_imports_and_quantizes(ocr_models, which, shape):
    """PP-OCR's orientation classifier and PP-OCRv4's recognizer (dynamic H/W, shape subgraphs that
    TVM 0.27 cannot import as they are): import (checked against ONNX Runtime); the classifier is
    also quantized, compiled and run (the recognizer's quantization and build are in
    benchmarks/import_corpus.py: a minute of calibration on 2 cores)."""
    path = os.path.join(ocr_models, corpus.PPOCR_MODELS[which][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fq.load_model(path, input_shape=shape)
        assert model.import_check is not None and model.fixed_batch is None
        assert len(model.layers) > 40
        if which == "rec":
            return
        x = np.random.default_rng(8).uniform(-1, 1, (8,) + shape).astype(np.float32)
        plan = quick_plan(model, x)
    assert plan.num_layers > 40 and plan.meta["input_shape"] == list(shape)
    if which == "cls":
        from flexiq_tvm.frontend.onnx_import import ort_run, ort_session

        cm = fq.compile(model, plan, batch_size=2)
        ref = ort_run(ort_session(onnx.load(path)), x[:2])[0]
        y = cm(x[:2])
        assert y.shape == ref.shape and rel_err(y, ref) < 0.2
