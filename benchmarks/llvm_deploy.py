"""What the llvm target's deployment rewrites buy on ImageNet MobileNetV2 (or the shipped ViT),
side by side in one run.

    python3 benchmarks/llvm_deploy.py [--model mobilenetv2|vit] [--batch-sizes 1 32] [--threads 1 2]
                                      [--rounds 5] [--json OUT]

Configs (one process, interleaved rounds, median of per-round times; speedups are medians of the
paired per-round ratios):
  plain      fq.compile(..., hoist_weights=False, fuse_activations=False, kernel_variants=False):
             the kernels as the rewrite emits them (weights lowered on every call, ReLU6 as
             separate kernels, in-kernel activation repack, strided depthwise on strided loads)
  deploy     fq.compile(...) defaults (targets/llvm.py `prepare`)
  ORT FP32 / ORT INT8 (QDQ, per-channel, U8S8: benchmarks/cpu_latency.py's quantizer)
Both FlexiQ builds are checked bit-exact at ratios 0 and 0.5, and the cost of lowering the weights
for a new ratio (`CompiledModel.last_lowering_s`) is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", choices=["mobilenetv2", "vit"], default="mobilenetv2")
    ap.add_argument("--plan", default=None, help="default: benchmarks/gpu_results/plans/<model>.plan.json, "
                    "made (range search, groups of 64, as gpu_check.py) and cached there when missing")
    ap.add_argument("--work-dir", default="/tmp/flexiq_llvm_deploy")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.plan is None:
        args.plan = os.path.join(HERE, "gpu_results", "plans", f"{args.model}.plan.json")
    os.makedirs(args.work_dir, exist_ok=True)
    results = []
    for threads in args.threads:
        # TVM reads the thread count once per process: one child process per setting
        if len(args.threads) > 1:
            import subprocess

            out = os.path.join(args.work_dir, f"t{threads}.json")
            cmd = [sys.executable, __file__, "--threads", str(threads), "--rounds", str(args.rounds), "--plan", args.plan,
                   "--model", args.model,
                   "--work-dir", args.work_dir, "--json", out, "--batch-sizes", *map(str, args.batch_sizes)]
            subprocess.run(cmd, check=True)
            results += json.load(open(out))
            continue
        os.environ["TVM_NUM_THREADS"] = str(threads)
        results += run(args, threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def run(args, threads):
    import onnxruntime as ort

    import cpu_latency as cl
    import gpu_check as g

    import flexiq_tvm as fq
    from flexiq_tvm.quant.plan import Plan

    _, model, calib_path, path = g.BUILDERS[args.model](args.work_dir)
    if os.path.exists(args.plan):
        plan = Plan.load(args.plan)
    else:   # a fresh checkout: gpu_check.py's plan (range search, groups of 64), made once and cached there
        print(f"{args.plan} not found: quantizing (a few minutes, cached for the next run)", flush=True)
        plan = g.quantize(model, calib_path, cache=os.path.dirname(args.plan), key=args.model)
    shape = tuple(int(v) for v in model.input_shape)
    iname = _input_name(path)
    if args.model == "vit":   # the shipped calibration images
        calib = np.load(calib_path)[np.load(calib_path).files[0]][:64].astype(np.float32)
    else:
        calib = np.random.default_rng(1).standard_normal((8,) + shape).astype(np.float32)
    qdq = cl.ort_quantize(path, calib, iname, args.work_dir, "quint8")
    rows = []
    for B in args.batch_sizes:
        x = np.random.default_rng(0).standard_normal((B,) + shape).astype(np.float32)
        builds = {"plain": dict(hoist_weights=False, fuse_activations=False, kernel_variants=False), "deploy": {}}
        cms = {k: fq.compile(model, plan, batch_size=B, **o) for k, o in builds.items()}
        exact = True
        lowering = {}
        for r in (0.0, 0.5):
            ys = []
            for k, cm in cms.items():
                cm(x[:1].repeat(B, 0))
                cm.set_ratio(r)
                if k == "deploy":
                    lowering[r] = cm.last_lowering_s
                ys.append(cm(x))
            exact &= bool(np.array_equal(ys[0], ys[1]))
        sessions = {}
        for name, p in (("ORT FP32", path), ("ORT INT8", qdq)):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sessions[name] = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])

        def ort_fn(s):
            return lambda: s.run(None, {iname: x})

        runners = {}
        for k, cm in cms.items():
            for r in (0.0, 0.5):
                runners[f"FlexiQ {k} r={r}"] = (cm, r)
        for name, s in sessions.items():
            runners[name] = ort_fn(s)
        times = {k: [] for k in runners}
        for rnd in range(args.rounds):
            keys = list(runners)[rnd % len(runners):] + list(runners)[:rnd % len(runners)]
            for k in keys:
                v = runners[k]
                if isinstance(v, tuple):
                    cm, r = v
                    cm.set_ratio(r)
                    times[k].append(cm.time_batch(number=3, repeat=1))
                else:
                    v()
                    t0 = time.perf_counter()
                    for _ in range(3):
                        v()
                    times[k].append((time.perf_counter() - t0) / 3)
        ort8 = np.array(times["ORT INT8"])
        for k, ts in times.items():
            ts = np.array(ts)
            row = {"threads": threads, "batch": B, "config": k, "median_ms": float(np.median(ts) * 1e3),
                   "best_ms": float(ts.min() * 1e3), "vs_ort_int8": float(np.median(ts / ort8)),
                   "bit_exact_plain_vs_deploy": exact, "lowering_ms": {str(r): v * 1e3 for r, v in lowering.items()}}
            rows.append(row)
            print(f"threads {threads} batch {B:3d}  {k:28s} {row['median_ms']:9.2f} ms (best {row['best_ms']:8.2f})"
                  f"  x ORT INT8 time: {row['vs_ort_int8']:.2f}", flush=True)
        print(f"  plain vs deploy bit-exact: {exact}; deploy weight lowering on a new ratio: "
              + ", ".join(f"r={r}: {v * 1e3:.2f} ms" for r, v in lowering.items()), flush=True)
    return rows


def _input_name(path):
    import onnx

    return onnx.load(path, load_external_data=False).graph.input[0].name


if __name__ == "__main__":
    main()
