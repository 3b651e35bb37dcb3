#!/usr/bin/env python3
"""Issue 3, item 3: which fitness evaluator is faster, measured.

One candidate (per-layer 4-bit counts and group orders) scored on the search samples through
(a) the search build: the mixed model compiled once by TVM with counts, group-rank and weight-shift
tables as run-time inputs (`fitness.OutputDistance`, what the searches use), and (b) a numpy
evaluator: the whole model in numpy, the float parts by ONNX's reference evaluator and every FlexiQ
layer by `quant/reference.py` (vectorized integer einsums per kernel tap). Both are checked to give
the same logits first, so the comparison is between two correct evaluators.

    python3 benchmarks/fitness_speed.py [--samples 512] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.calibrate.data import load_data  # noqa: E402
from flexiq_tvm.search.fitness import OutputDistance  # noqa: E402
from flexiq_tvm.report.reference_model import build_onnx_reference  # noqa: E402


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    onnx_path = str(REPO / "flexiq_tvm" / "assets" / "fashion_cnn.onnx")
    model = fq.load_model(onnx_path)
    calib, _ = load_data(str(REPO / "flexiq_tvm" / "assets" / "fashion_calib.npz"), model)
    x = calib[: args.samples]
    plan = fq.quantize(model, x, search="range", recover=False, progress=False)
    counts = plan.counts_for_ratio(0.5)

    t = time.perf_counter()
    fit = OutputDistance(model, plan, x, batch_size=64)
    build_s = time.perf_counter() - t
    run_ref = build_onnx_reference(onnx_path, model, plan)
    y_tvm = fit.logits(counts)
    y_np = run_ref(x, counts)
    if not np.array_equal(y_tvm, y_np):
        raise SystemExit(f"the two evaluators disagree (max |diff| {np.abs(y_tvm - y_np).max():.3g})")
    tvm_s = best_of(lambda: fit(counts), args.repeat)
    np_s = best_of(lambda: run_ref(x, counts), args.repeat)
    print(f"demo CNN, one candidate on {x.shape[0]} samples (identical logits from both):")
    print(f"  search build (TVM, compiled once in {build_s:.1f} s): {1e3 * tvm_s:8.1f} ms")
    print(f"  numpy evaluator (ONNX reference + quant/reference.py): {1e3 * np_s:8.1f} ms")
    print(f"  the search build is {np_s / tvm_s:.1f}x faster per candidate")


if __name__ == "__main__":
    main()
