"""The `flexiq` command end to end, as a user runs it."""
import json
import subprocess
import sys

import numpy as np


def flexiq(*args, timeout=900):
    r = subprocess.run([sys.executable, "-m", "flexiq_tvm", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def test_quantize_compile_eval(tmp_path, graph):
    g = graph((3, 10, 10), seed=11)
    g.conv(3, 16, 3, 1, 1)
    g.relu()
    g.conv(16, 16, 3, 2, 1, groups=16)
    g.relu()
    g.gap()
    g.flatten()
    g.gemm(16, 5)
    model = g.save(tmp_path / "net.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", inputs=rng.standard_normal((20, 3, 10, 10)).astype(np.float32))
    np.savez(tmp_path / "test.npz", inputs=rng.standard_normal((30, 3, 10, 10)).astype(np.float32),
             labels=rng.integers(0, 5, 30))
    rc, out, err = flexiq("quantize", model, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "net.flexiq",
                          "--group-size", 8, "--quiet")
    assert rc == 0, err
    assert "3 FlexiQ layers" in out
    rc, out, err = flexiq("compile", model, "--plan", tmp_path / "net.flexiq", "--target", "llvm",
                          "-o", tmp_path / "net.so")
    assert rc == 0, err
    assert (tmp_path / "net.so").stat().st_size > 0
    rc, out, err = flexiq("eval", model, "--plan", tmp_path / "net.flexiq", "--data", tmp_path / "test.npz",
                          "--ratios", "0,0.5,1", "--json", tmp_path / "r.json", "--quiet")
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["fp32"]) >= {"top1", "latency_ms"}
    assert [e["ratio"] for e in rep["ratios"]] == [0.0, 0.5, 1.0]
    for e in rep["ratios"]:
        assert set(e) >= {"ratio", "mac_ratio", "top1", "agree_top1", "kl", "latency_ms"}
    assert rep["ratios"][0]["mac_ratio"] == 0.0 and rep["ratios"][-1]["mac_ratio"] == 1.0
    # errors: a clear message naming the option or file, exit code 2
    rc, out, err = flexiq("eval", model, "--plan", tmp_path / "net.flexiq", "--data", tmp_path / "test.npz",
                          "--ratios", "0,1.5")
    assert rc == 2 and "outside [0, 1]" in err
    rc, out, err = flexiq("compile", model, "--plan", tmp_path / "missing.flexiq", "-o", tmp_path / "x.so")
    assert rc == 2 and "missing.flexiq" in err
    assert not (tmp_path / "x.so").exists()


def test_demo_meets_the_bars(tmp_path):
    """The shipped default: INT8 within 0.3 points of FP32, ratio 0.5 within 1.0 point of INT8."""
    rc, out, err = flexiq("demo", "--json", tmp_path / "demo.json", "--quiet")
    assert rc == 0, err
    print(out)
    rep = json.loads((tmp_path / "demo.json").read_text())
    by_ratio = {e["ratio"]: e for e in rep["ratios"]}
    assert rep["samples"] == 2000
    fp32, int8, half = rep["fp32"]["top1"], by_ratio[0.0]["top1"], by_ratio[0.5]["top1"]
    assert abs(int8 - fp32) <= 0.003, (fp32, int8)
    assert int8 - half <= 0.010, (int8, half)
    assert abs(by_ratio[0.5]["mac_ratio"] - 0.5) < 0.05
