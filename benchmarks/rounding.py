#!/usr/bin/env python3
"""INT8 weight rounding, nearest vs error-compensating (`fq.quantize(rounding=...)`), on the demo models.

Each rounding runs the full default pipeline (percentile calibration, evolutionary search,
per-ratio bias correction; same seed) and the one compiled artifact is evaluated at the standard
ratios: top-1, agreement with FP32 and KL, on the demo test images. The same comparison on ImageNet
MobileNetV2 is the example's `--rounding` option (see benchmarks/README.md).

    python3 benchmarks/rounding.py [--models cnn,vit] [--subset] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import flexiq_tvm as fq  # noqa: E402
from ablation import demo_model_and_data  # noqa: E402
from flexiq_tvm.report.evaluate import evaluate  # noqa: E402

ROUNDINGS = ("nearest", "compensated")
MODEL_FILES = {"cnn": "fashion_cnn.onnx", "vit": "fashion_vit.onnx"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,vit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", action="store_true", help="the shipped 2,000 test images even if the full split is installed")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = {}
    for name in args.models.split(","):
        model, calib, x, labels = demo_model_and_data(args.subset, MODEL_FILES[name])
        for rounding in ROUNDINGS:
            t = time.perf_counter()
            plan = fq.quantize(model, calib, rounding=rounding, seed=args.seed, progress=False)
            q_s = time.perf_counter() - t
            rep = evaluate(model, plan, {"inputs": x, "labels": labels}, latency=False, progress=False)
            row = {"quantize_seconds": round(q_s, 1), "fp32_top1": rep["fp32"]["top1"],
                   "ratios": [{k: e[k] for k in ("ratio", "mac_ratio", "top1", "agree_top1", "kl")} for e in rep["ratios"]]}
            out[f"{name}/{rounding}"] = row
            cells = "  ".join(f"{e['ratio']:g}: {100 * e['top1']:.2f}% ({100 * e['agree_top1']:.2f}%, KL {e['kl']:.5f})"
                              for e in row["ratios"])
            print(f"{name:4s} {rounding:12s} quantize {q_s:6.1f} s  FP32 {100 * row['fp32_top1']:.2f}%  {cells}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
