#!/usr/bin/env python3
"""Accuracy vs hardware group size (issue 3, item 4) on the demo CNN.

A group of input channels is lowered to 4-bit as a whole and shares one activation shift (and one
weight shift per output channel), so a smaller group follows each channel's range more closely
and lets the search pick finer sets, while a larger one matches wider hardware tiles (tensor-core
K tiles, NPU array columns). For each group size the full default pipeline runs (`fq.quantize`:
percentile calibration, evolutionary search, per-ratio bias correction; same seed) and the one
compiled artifact is evaluated at the standard ratios, with the achieved 4-bit MAC share and the
plan's relative squared error of the lowered weights (all groups in 4-bit).

    python3 benchmarks/group_size.py [--sizes 1,8,16,32,64] [--subset] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.quant.reference import reference_layers  # noqa: E402

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def weight_lowering_error(model, plan) -> float:
    """sum ||W_lowered - W_int8||^2 / sum ||W_int8||^2 over all layers, every group in 4-bit (codes)."""
    from flexiq_tvm.quant.bitextract import lower

    num = den = 0.0
    for ref in reference_layers(model.specs, plan):
        q = ref.q_w
        rank = ref.rank[ref.channel_of]                                   # (O, Cg)
        e = np.take_along_axis(ref.plan.weight_shift, rank, axis=1)       # (O, Cg)
        e = e.reshape(e.shape + (1,) * (q.ndim - 2))
        num += float(np.sum((lower(q, e, False) - q).astype(np.float64) ** 2))
        den += float(np.sum(q.astype(np.float64) ** 2))
    return num / den


def main(argv=None):
    from ablation import demo_model_and_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8,16,32,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", action="store_true", help="the shipped 2,000 test images even if the full split is installed")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model, calib, x, labels = demo_model_and_data(args.subset)
    rows = {}
    for gs in [int(v) for v in args.sizes.split(",")]:
        t = time.perf_counter()
        plan = fq.quantize(model, calib, group_size=gs, seed=args.seed, progress=False)
        q_s = time.perf_counter() - t
        cm = fq.compile(model, plan, batch_size=100)
        row = {"groups": sum(l.n_groups for l in plan.layers), "quantize_s": round(q_s, 1),
               "weight_rel_sq_error_all_4bit": weight_lowering_error(model, plan), "ratios": {}}
        for r in RATIOS:
            cm.set_ratio(r)
            y = cm(x)
            row["ratios"][r] = {"top1": float(np.mean(y.argmax(1) == labels)), "mac_ratio": cm.mac_ratio}
        rows[gs] = row
        print(f"group {gs:>3}: {row['groups']:>4} groups, quantize {q_s:6.1f} s, weight error {row['weight_rel_sq_error_all_4bit']:.4f}, "
              + "  ".join(f"{r:g}: {100 * v['top1']:.2f}% ({100 * v['mac_ratio']:.0f}%)" for r, v in row["ratios"].items()),
              flush=True)
    print(f"\ndemo CNN, top-1 on {len(x)} test images, default fq.quantize, seed {args.seed}")
    print("| group size | groups | INT8 | r=0.25 | r=0.5 | r=0.75 | r=1.0 | weight error (all 4-bit) | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for gs, row in rows.items():
        cells = " | ".join(f"{100 * v['top1']:.2f}%" + (f" ({100 * v['mac_ratio']:.0f}%)" if r > 0 else "")
                           for r, v in row["ratios"].items())
        print(f"| {gs} | {row['groups']} | {cells} | {row['weight_rel_sq_error_all_4bit']:.4f} | {row['quantize_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"fashion_cnn": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
