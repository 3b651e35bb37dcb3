"""Image folders as calibration / evaluation data: preprocessing spec, labels, bad files, CLI, plot."""
import json
import os

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.cli import main as cli_main  # noqa: E402
from flexiq_tvm.calibrate.data import load_data  # noqa: E402
from flexiq_tvm.errors import DataError  # noqa: E402
from flexiq_tvm.calibrate.images import ImageFolder, Preprocess, load_image_folder  # noqa: E402


def _save(path, arr):
    Image.fromarray(arr).save(path)
    return arr


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_preprocess_parse_forms():
    p = Preprocess.parse("imagenet")
    assert p.resize == 256 and p.crop == (224, 224) and p.layout == "NCHW" and p.sample_shape == (3, 224, 224)
    p = Preprocess.parse("resize=36,crop=32,mean=0.5/0.4/0.3,std=0.2,layout=nhwc,mode=rgb")
    assert p.resize == 36 and p.crop == (32, 32) and p.mean == (0.5, 0.4, 0.3) and p.std == (0.2,) * 3
    assert p.sample_shape == (32, 32, 3)
    p = Preprocess.parse("fashion,crop=14")
    assert p.mode == "L" and p.sample_shape == (1, 14, 14) and p.resize is None
    assert Preprocess.parse({"crop": 8, "resize": None, "mode": "L", "mean": 0, "std": 1}).sample_shape == (1, 8, 8)
    for bad, msg in [("resize=256,colour=1", "unknown key"), ("crop=abc", "bad value"), ("mode=CMYK", "RGB or L"),
                     ("std=0", "positive"), ("mean=1/2", "2 values for 3 channels"), ("vgg", "unknown preset")]:
        with pytest.raises(DataError, match=msg):
            Preprocess.parse(bad)


def test_folder_values_labels_and_order(tmp_path):
    rng = np.random.default_rng(0)
    want = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            want[(cls, i)] = _save(tmp_path / cls / f"{i}.png", _rgb(rng, 10, 12))
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    x, y = load_image_folder(tmp_path, "unit,crop=10/12", input_shape=(3, 10, 12))
    assert x.shape == (6, 3, 10, 12) and x.dtype == np.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(x[4], want[("dog", 1)].transpose(2, 0, 1) / 255.0, atol=1e-6)
    # mean/std and NHWC
    x2, _ = load_image_folder(tmp_path, "crop=10/12,resize=none,mean=0.5,std=0.25,layout=NHWC")
    np.testing.assert_allclose(x2[0], (want[("cat", 0)] / 255.0 - 0.5) / 0.25, atol=1e-5)


def test_resize_and_center_crop(tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 20:40] = 255                                # a white vertical band in the middle third
    _save(tmp_path / "band.png", img)
    x, _ = load_image_folder(tmp_path, "unit,resize=20,crop=20", input_shape=(3, 20, 20))
    # shorter side 40 -> 20 (width 60 -> 30), center crop 20 of 30: columns 5..24 of the resized image
    row = x[0, 0, 10]
    assert row[:4].max() < 0.05 and row[16:].max() < 0.05 and row[6:14].min() > 0.95


def test_grayscale_and_spec_file(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        _save(tmp_path / f"g{i}.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    (tmp_path / "preprocess.json").write_text(json.dumps({"crop": 28, "resize": None, "mode": "L",
                                                          "mean": [0.286], "std": [0.353]}))
    x, y = load_image_folder(tmp_path, input_shape=(1, 28, 28))
    assert x.shape == (2, 1, 28, 28) and y is None
    assert abs(float(x.min()) - (0 - 0.286) / 0.353) < 0.2


def test_bad_image_file_is_named(tmp_path):
    rng = np.random.default_rng(2)
    _save(tmp_path / "a.png", _rgb(rng, 8, 8))
    (tmp_path / "b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError, match=r"b_broken\.jpg: not a readable image"):
        load_image_folder(tmp_path, "unit,crop=8", input_shape=(3, 8, 8))
    good = _rgb(rng, 8, 8)
    os.remove(tmp_path / "b_broken.jpg")
    Image.fromarray(good).save(tmp_path / "c_trunc.png")
    data = (tmp_path / "c_trunc.png").read_bytes()
    (tmp_path / "c_trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"c_trunc\.png"):
        load_image_folder(tmp_path, "unit,crop=8")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"(c_trunc|empty)\.png"):
        load_image_folder(tmp_path, "unit,crop=8")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such image folder"):
        load_image_folder(tmp_path / "missing", "unit")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path, "unit")
    _save(tmp_path / "a.png", _rgb(np.random.default_rng(0), 9, 9))
    with pytest.raises(DataError, match=r"shape \(3, 8, 8\).*model's input is \(1, 8, 8\)"):
        load_image_folder(tmp_path, "unit,crop=8", input_shape=(1, 8, 8))
    with pytest.warns(UserWarning, match="no preprocessing spec"):
        x, _ = load_image_folder(tmp_path, input_shape=(3, 8, 8))
    assert x.shape == (1, 3, 8, 8)
    (tmp_path / "preprocess.json").write_text("{not json")
    with pytest.raises(DataError, match="preprocess.json: not a readable preprocessing spec"):
        load_image_folder(tmp_path, input_shape=(3, 8, 8))


@pytest.fixture(scope="module")
def small_image_model(tmp_path_factory):
    from conftest import GraphBuilder

    d = tmp_path_factory.mktemp("imgmodel")
    g = GraphBuilder((3, 16, 16), seed=5)
    g.conv(3, 16, 3, 2, 1)
    g.relu()
    g.conv(16, 16, 3, 1, 1, groups=16)
    g.relu()
    g.conv(16, 32, 1, 1, 0)
    g.gap()
    g.flatten()
    g.gemm(32, 4)
    path = g.save(d / "img.onnx")
    rng = np.random.default_rng(3)
    for split, n in (("calib", 12), ("eval", 8)):
        for c in range(2):
            (d / split / f"class{c}").mkdir(parents=True)
            for i in range(n // 2):
                _save(d / split / f"class{c}" / f"{i}.jpg", _rgb(rng, 20 + i, 22))
    return path, d


def test_quantize_and_evaluate_from_image_folders(small_image_model):
    from flexiq_tvm.report.evaluate import evaluate

    path, d = small_image_model
    model = fq.load_model(path)
    spec = "imagenet,resize=18,crop=16"
    x, y = load_data(ImageFolder(str(d / "eval"), spec), model)
    assert x.shape == (8, 3, 16, 16) and y.tolist() == [0] * 4 + [1] * 4
    plan = fq.quantize(model, ImageFolder(str(d / "calib"), spec), group_size=8, search="range", progress=False)
    assert plan.meta["calib_samples"] == 12
    rep = evaluate(model, plan, ImageFolder(str(d / "eval"), spec), ratios=[0, 1], latency=False, progress=False)
    assert rep["samples"] == 8 and rep["fp32"]["top1"] is not None


def test_cli_image_folders_and_plot(small_image_model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, d = small_image_model
    plan_path, png, js = tmp_path / "m.flexiq", tmp_path / "pareto.png", tmp_path / "r.json"
    spec = "imagenet,resize=18,crop=16"
    assert cli_main(["quantize", path, "--calib", str(d / "calib"), "--preprocess", spec, "-o", str(plan_path),
                     "--search", "range", "--group-size", "8", "--quiet"]) == 0
    assert cli_main(["eval", path, "--plan", str(plan_path), "--data", str(d / "eval"), "--preprocess", spec,
                     "--ratios", "0,0.5,1", "--batch-size", "4", "--plot", str(png), "--json", str(js),
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote " + str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    rep = json.loads(js.read_text())
    assert [e["ratio"] for e in rep["ratios"]] == [0, 0.5, 1]
    # --preprocess on an .npz is a usage error that names the file
    np.savez(tmp_path / "x.npz", inputs=np.zeros((2, 3, 16, 16), np.float32))
    assert cli_main(["eval", path, "--plan", str(plan_path), "--data", str(tmp_path / "x.npz"),
                     "--preprocess", spec, "--quiet"]) == 2
    assert "x.npz is not a folder" in capsys.readouterr().err
    # a broken image in the eval folder: the error names it
    (d / "eval" / "class1" / "zz_broken.png").write_bytes(b"garbage")
    try:
        assert cli_main(["eval", path, "--plan", str(plan_path), "--data", str(d / "eval"), "--preprocess", spec,
                         "--quiet"]) == 2
        assert "zz_broken.png: not a readable image" in capsys.readouterr().err
    finally:
        os.remove(d / "eval" / "class1" / "zz_broken.png")


def test_plot_without_labels_or_latency(tmp_path):
    pytest.importorskip("matplotlib")
    from flexiq_tvm.report.plot import plot_report

    rep = {"model": "m", "samples": 10, "target": "llvm", "group_size": 16, "fp32": {"top1": None},
           "ratios": [{"ratio": r, "mac_ratio": r, "agree_top1": 1 - r / 10, "kl": r} for r in (0, 0.5, 1)]}
    out = plot_report(rep, tmp_path / "a.png")
    assert os.path.getsize(out) > 10000
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_plot_draws_baseline_rows(tmp_path):
    """A report's baselines (other quantizers, the noise floor) become reference lines; the y range
    stretches to include them, so a baseline far below the ratios is still visible."""
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from flexiq_tvm.report.plot import plot_report

    rep = {"model": "m", "samples": 10, "target": "llvm", "group_size": 16, "fp32": {"top1": None},
           "ratios": [{"ratio": r, "mac_ratio": r, "agree_top1": 1 - r / 10, "kl": r} for r in (0, 0.5, 1)],
           "baselines": {"other INT8": {"agree_top1": 0.2, "kl": 1.0}, "no metric": {"kl": 0.1}}}
    with_refs = mpimg.imread(plot_report(rep, tmp_path / "b.png"))
    del rep["baselines"]
    without = mpimg.imread(plot_report(rep, tmp_path / "c.png"))
    assert with_refs.shape == without.shape and not np.array_equal(with_refs, without)
