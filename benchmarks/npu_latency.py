"""Simulated NPU cycles and latency per ratio (issue 5).

For each model: compile once for target "npu" (batch 1), run one sample at every ratio, and print
the cycles (total / compute / DMA / vector), the simulated latency, the speedup over INT8, the
fraction of the all-4-bit speedup reached at ratio 0.5 (paper: 40%), and the array utilisation per
layer at ratio 0 and 1.  The demo CNN runs by default; `--model/--calib` add models (ONNX + .npz
calibration inputs), and the ViT / MobileNetV2 assets are picked up when their files exist.

    python benchmarks/npu_latency.py [--model m.onnx --calib c.npz]... [--npu-config JSON] [--json out.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.data import load_data  # noqa: E402

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _default_models():
    assets = os.path.join(ROOT, "flexiq_tvm", "assets")
    models = [("demo_cnn", os.path.join(assets, "fashion_cnn.onnx"), os.path.join(assets, "fashion_calib.npz"))]
    for key in ("vit", "mobilenet"):
        for onnx_path in sorted(glob.glob(os.path.join(ROOT, "flexiq_tvm", "assets", f"*{key}*.onnx")) +
                                glob.glob(os.path.join(ROOT, "examples", "**", f"*{key}*.onnx"), recursive=True)):
            stem = os.path.splitext(onnx_path)[0]
            calib = next((c for c in (stem + "_calib.npz", stem.replace("model", "calib") + ".npz",
                                      os.path.join(os.path.dirname(onnx_path), f"{key}_calib.npz"))
                          if os.path.exists(c)), None)
            if calib:
                models.append((os.path.basename(stem), onnx_path, calib))
                break
    return models


def bench(name, model_path, calib_path, npu_config, search, calib_samples):
    model = fq.load_model(model_path)
    calib, _ = load_data(calib_path, model)
    import inspect

    kw = {"recover": False} if "recover" in inspect.signature(fq.quantize).parameters else {}
    plan = fq.quantize(model, calib[:calib_samples], search=search, progress=False, **kw)
    cm = fq.compile(model, plan, target="npu", batch_size=1, npu_config=npu_config)
    x = calib[:1]
    rows = {}
    for r in RATIOS:
        cm.set_ratio(r)
        cm(x)
        st = cm.npu_stats()
        rows[r] = {"ratio": r, "mac_ratio": round(cm.mac_ratio, 4), "cycles": st["total_cycles"],
                   "compute": st["compute_cycles"], "dma": st["dma_cycles"], "vector": st["vector_cycles"],
                   "latency_us": round(st["latency_us"], 3), "layers": st["layers"], "config": st["config"]}
    c0, c5, c1 = rows[0.0]["cycles"], rows[0.5]["cycles"], rows[1.0]["cycles"]
    frac = (c0 - c5) / (c0 - c1) if c0 != c1 else float("nan")
    return {"model": name, "path": model_path, "layers_on_npu": len(rows[0.0]["layers"]),
            "num_layers": plan.num_layers, "ratios": rows, "speedup_all_4bit": c0 / c1,
            "fraction_of_all_4bit_speedup_at_0.5": frac}


def report(res):
    print(f"\n== {res['model']} ({res['layers_on_npu']}/{res['num_layers']} layers on the NPU; "
          f"config {res['ratios'][0.0]['config']})")
    print(f"{'ratio':>6} {'4b MACs':>8} {'cycles':>9} {'compute':>9} {'dma':>9} {'vector':>8} {'lat us':>8} {'speedup':>8}")
    c0 = res["ratios"][0.0]["cycles"]
    for r, row in res["ratios"].items():
        print(f"{r:>6.2f} {row['mac_ratio']:>8.3f} {row['cycles']:>9d} {row['compute']:>9d} {row['dma']:>9d} "
              f"{row['vector']:>8d} {row['latency_us']:>8.2f} {c0 / row['cycles']:>8.3f}")
    print(f"all-4-bit speedup {res['speedup_all_4bit']:.3f}x; fraction of it reached at ratio 0.5: "
          f"{100 * res['fraction_of_all_4bit_speedup_at_0.5']:.1f}% (paper: 40%)")
    print(f"{'layer':<14} {'bound@0':>8} {'util@0':>7} {'util@1':>7} {'cyc@0':>8} {'cyc@1':>8}")
    for l0, l1 in zip(res["ratios"][0.0]["layers"], res["ratios"][1.0]["layers"]):
        print(f"{l0.get('name', l0['layer']):<14} {l0['bound']:>8} {l0['utilization']:>7.3f} "
              f"{l1['utilization']:>7.3f} {l0['total']:>8d} {l1['total']:>8d}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="ONNX model (repeatable; pairs with --calib)")
    ap.add_argument("--calib", action="append", default=[], help=".npz calibration inputs for each --model")
    ap.add_argument("--npu-config", default=None, help="JSON NPU configuration (docs/npu.md)")
    ap.add_argument("--search", default="range", help="quantize search (default range: fast)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--only-given", action="store_true", help="skip the default models")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if len(a.model) != len(a.calib):
        ap.error("give one --calib per --model")
    models = [] if a.only_given else _default_models()
    models += [(os.path.splitext(os.path.basename(m))[0], m, c) for m, c in zip(a.model, a.calib)]
    cfg = json.loads(a.npu_config) if a.npu_config else None
    results = []
    for name, m, c in models:
        res = bench(name, m, c, cfg, a.search, a.calib_samples)
        report(res)
        results.append(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
