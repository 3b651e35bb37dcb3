"""Bad input gets a clear error naming the file, layer or option at fault; failures leave no files."""
import os
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import flexiq_tvm as fq
from flexiq_tvm.frontend.layers import FloatFallbackWarning


def test_malformed_onnx_names_the_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff\xff")
    with pytest.raises(fq.ModelError, match="broken.onnx"):
        fq.load_model(str(bad))
    with pytest.raises(fq.ModelError, match="missing.onnx: no such model file"):
        fq.load_model(str(tmp_path / "missing.onnx"))


def test_invalid_graph_names_the_file(tmp_path):
    node = helper.make_node("Relu", ["nope"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    path = tmp_path / "dangling.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(fq.ModelError, match="dangling.onnx: malformed ONNX"):
        fq.load_model(str(path))


def test_unsupported_layer_falls_back_to_float_with_a_warning(tmp_path, graph):
    g = graph((4, 8, 8), seed=2)
    g.conv(4, 8, 3, 1, 1)
    g.relu()
    w = g.const(np.random.default_rng(0).standard_normal((8, 4, 2, 2)) * 0.2)
    g.node("ConvTranspose", [g.cur, w], kernel_shape=[2, 2], strides=[2, 2])
    g.relu()
    g.conv(4, 6, 1, 1, 0)
    path = g.save(tmp_path / "deconv.onnx")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = fq.load_model(path)
    msgs = [str(w.message) for w in rec if issubclass(w.category, FloatFallbackWarning)]
    assert any("conv2d_transpose" in m and "float32" in m for m in msgs), msgs
    assert model.layer_names == ["conv2d_0", "conv2d_1"]
    calib = np.random.default_rng(0).standard_normal((16, 4, 8, 8)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=False, progress=False)
    cm = fq.compile(model, plan, batch_size=2)
    fp32 = fq.compile_float(model, 2)
    import tvm
    x = calib[:2]
    ref = fp32["main"](tvm.runtime.tensor(x)).numpy()
    cm.set_ratio(0.0)
    y = cm(x)
    # INT8 stays close to FP32 through the float deconvolution
    assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.99


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from conftest import GraphBuilder
    g = GraphBuilder((3, 8, 8), seed=5)
    g.conv(3, 8, 3, 1, 1)
    g.relu()
    g.gap()
    g.flatten()
    g.gemm(8, 4)
    path = g.save(tmp_path_factory.mktemp("m") / "small.onnx")
    model = fq.load_model(path)
    calib = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    return path, model, calib


def test_calibration_data_errors(small, tmp_path):
    _, model, calib = small
    with pytest.raises(fq.DataError, match=r"calibration data: shape \(16, 8, 8\) does not match"):
        fq.quantize(model, calib[:, 0], progress=False)
    with pytest.raises(fq.DataError, match="no batch axis"):
        fq.quantize(model, calib[0], progress=False)
    bad = calib.copy()
    bad[3, 1, 2, 2] = np.nan
    with pytest.raises(fq.DataError, match="NaN or inf.*sample 3"):
        fq.quantize(model, bad, progress=False)
    bad[3, 1, 2, 2] = np.inf
    with pytest.raises(fq.DataError, match="NaN or inf"):
        fq.quantize(model, bad, progress=False)
    np.savez(tmp_path / "nokey.npz", images=calib)
    with pytest.raises(fq.DataError, match="nokey.npz: no 'inputs' array"):
        fq.quantize(model, str(tmp_path / "nokey.npz"), progress=False)
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(fq.DataError, match="junk.npz: not a readable .npz"):
        fq.quantize(model, str(tmp_path / "junk.npz"), progress=False)
    with pytest.raises(ValueError, match="calibrator"):
        fq.quantize(model, calib, calibrator="entropy", progress=False)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        fq.quantize(model, calib, ratios=[0.5, 1.5], progress=False)


def test_mismatched_plan_is_rejected(small, tmp_path, graph):
    path, model, calib = small
    plan = fq.quantize(model, calib, search="range", recover=False, progress=False)
    g = graph((3, 8, 8), seed=6)            # same structure, other weights
    g.conv(3, 8, 3, 1, 1)
    g.relu()
    g.gap()
    g.flatten()
    g.gemm(8, 4)
    other = fq.load_model(g.save(tmp_path / "other.onnx"))
    with pytest.raises(fq.PlanError, match="does not match.*fingerprint"):
        fq.compile(other, plan)
    g = graph((3, 8, 8), seed=6)            # other structure
    g.conv(3, 8, 3, 1, 1)
    g.gap()
    g.flatten()
    third = fq.load_model(g.save(tmp_path / "third.onnx"))
    with pytest.raises(fq.PlanError, match="quantizable layers differ"):
        fq.compile(third, plan)


def test_failed_writes_leave_no_file(small, tmp_path, monkeypatch):
    _, model, calib = small
    plan = fq.quantize(model, calib, search="range", recover=False, progress=False)
    cm = fq.compile(model, plan, batch_size=1)
    target = tmp_path / "model.so"

    def boom(path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(cm.executable, "export_library", boom, raising=False)
    with pytest.raises(RuntimeError, match="disk full"):
        cm.export(target)
    assert os.listdir(tmp_path) == []
    plan.meta["unserializable"] = object()
    with pytest.raises(TypeError):
        plan.save(tmp_path / "p.flexiq")
    assert os.listdir(tmp_path) == []
    with pytest.raises(fq.FlexiQError, match="not a loadable|no such artifact"):
        fq.load_artifact(tmp_path / "none.so")
