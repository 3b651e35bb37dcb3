"""Tuned vs untuned: FlexiQ at every standard ratio, TVM FP32, ONNX Runtime FP32 and INT8, in one run.

    nice python benchmarks/tuning.py [--models mobilenetv2 vit] [--batch-sizes 1 32] [--trials 64]
                                     [--db DIR] [--json OUT] [--rounds 5]

For each model and batch size B, side by side in one process (timing: cpu_latency.py's interleaved
rounds, medians):

  FlexiQ r=...   untuned   fq.compile(model, plan, batch_size=B) (today's hand schedules)
  FlexiQ r=...   tuned     fq.tune(..., trials=N, db=DIR) then fq.compile(..., tuning_db=DIR)
  TVM FP32       untuned   the float model through TVM's default pipeline (naive loops on CPU)
  TVM FP32       tuned     the float model's tasks tuned with the same per-task budget N
                           (flexiq_tvm.tuning.tune_module on the float module) and applied
  ORT FP32 / ORT INT8 QDQ  (per-channel, U8S8), from benchmarks/cpu_latency.py

Also printed: each tuning's wall time and trials. Models: ImageNet MobileNetV2 (exported as in
gpu_check.py; plan benchmarks/gpu_results/plans/mobilenetv2.plan.json, or a quick range plan when the
exported weights do not match it) and the shipped ViT (plan .../vit.plan.json). The database
defaults to a temporary folder: pass --db to keep (and resume) it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

PLANS = REPO / "benchmarks" / "gpu_results" / "plans"
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenetv2", "vit"], choices=["mobilenetv2", "vit", "demo"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--trials", type=int, default=64, help="trials per task (FlexiQ and FP32 alike)")
    ap.add_argument("--db", default=None, help="tuning database (default: a temporary folder)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-block-s", type=float, default=0.2)
    ap.add_argument("--warmup-s", type=float, default=0.2)
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime baselines")
    ap.add_argument("--work", default=None, help="folder for exported models (default: temporary)")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def load(name, work):
    import flexiq_tvm as fq
    import gpu_check

    from flexiq_tvm.quant.plan import PlanError

    name, model, calib, path = gpu_check.BUILDERS[name](work)
    plan_file = PLANS / f"{name}.plan.json"
    plan = None
    if plan_file.exists():
        plan = fq.Plan.load(str(plan_file))
        try:
            fq.api.check_plan_model(plan, model)
        except PlanError as e:
            print(f"[{name}] shipped plan does not match the exported model ({str(e)[:120]}); quick range plan",
                  file=sys.stderr)
            plan = None
    if plan is None:
        plan = fq.quantize(model, calib, search="range", recover=False, progress=False)
    return name, model, plan, calib, path


def float_module(model, batch):
    import tvm

    main = model.mod["main"]
    n = main.params[0].ty.shape.values[0]
    if isinstance(n, tvm.tirx.IntImm):
        return model.mod
    return tvm.IRModule({"main": main.bind_symbolic_vars({n: int(batch)})})


def main(argv=None):
    args = parse_args(argv)
    import cpu_latency as cl

    import flexiq_tvm as fq
    import tvm
    from tvm import relax

    from flexiq_tvm.targets import get_target
    from flexiq_tvm.tuning import tune_module

    work = args.work or tempfile.mkdtemp(prefix="flexiq_tuning_bench_")
    os.makedirs(work, exist_ok=True)
    db = args.db or os.path.join(work, "db")
    results = {"trials_per_task": args.trials, "db": db, "models": {}}
    for mname in args.models:
        name, model, plan, calib, path = load(mname, work)
        mres = results["models"][name] = {}
        for B in args.batch_sizes:
            row = mres[str(B)] = {"tuning": {}, "latency_ms": {}}
            x = np.random.default_rng(0).standard_normal((B,) + tuple(model.input_shape)).astype(np.float32)
            cl.log(f"{name} B={B}: untuned builds")
            cm0 = fq.compile(model, plan, batch_size=B)
            t = time.perf_counter()
            rep = fq.tune(model, plan, trials=args.trials, db=db, batch_size=B, progress=True)
            row["tuning"]["flexiq"] = {"wall_s": round(time.perf_counter() - t, 1), "trials": rep.trials,
                                       "tasks": len(rep.tasks), "ratio_note": rep.ratio_note}
            print(rep.format())
            cm1 = fq.compile(model, plan, batch_size=B, tuning_db=db)
            tgt = get_target("llvm")
            fmod = float_module(model, B)
            t = time.perf_counter()
            frep = tune_module(fmod, tgt, os.path.abspath(db), args.trials, model_name=f"{name}-fp32",
                               batch_size=B, progress=True)
            row["tuning"]["fp32"] = {"wall_s": round(time.perf_counter() - t, 1), "trials": frep.trials,
                                     "tasks": len(frep.tasks)}
            target = tgt.tvm_target
            f0 = relax.VirtualMachine(tvm.compile(fmod, target=target,
                                                  relax_pipeline=relax.get_default_pipeline(target)), tvm.cpu())
            f1 = relax.VirtualMachine(tgt.build(fmod, tuning_db=os.path.abspath(db)), tvm.cpu())
            xt = tvm.runtime.tensor(x)
            runners = [cl.Runner("TVM FP32 untuned", "tvm_fp32", cl.tvm_block(f0, [xt])),
                       cl.Runner("TVM FP32 tuned", "tvm_fp32_tuned", cl.tvm_block(f1, [xt]))]
            for r in RATIOS:
                runners.append(cl.Runner(f"FlexiQ r={r:g} untuned", "flexiq", cl.flexiq_block(cm0, r, x), ratio=r))
                runners.append(cl.Runner(f"FlexiQ r={r:g} tuned", "flexiq_tuned", cl.flexiq_block(cm1, r, x),
                                         ratio=r))
            if not args.no_ort:
                threads = cl.cores()
                runners.append(cl.Runner("ORT FP32", "ort_fp32", cl.ort_block(cl.ort_session(path, threads), x)))
                cx = np.load(calib)["inputs"][:64].astype(np.float32)
                q = cl.ort_quantize(path, cx, cl.ort_session(path, threads).get_inputs()[0].name, work, "quint8")
                runners.append(cl.Runner("ORT INT8 QDQ", "ort_int8", cl.ort_block(cl.ort_session(q, threads), x)))
            cl.measure(runners, args.rounds, args.min_block_s, args.warmup_s, f"{name} B={B}")
            for r in runners:
                row["latency_ms"][r.name] = None if not r.rounds else round(float(np.median(r.rounds)) * 1e3, 4)
            print(f"\n{name}, batch {B}: FlexiQ tuning {row['tuning']['flexiq']}, FP32 tuning {row['tuning']['fp32']}")
            for k, v in row["latency_ms"].items():
                print(f"  {k:28s} {'-' if v is None else f'{v:10.3f} ms'}")
    if args.json:
        from flexiq_tvm.quant.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(results, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
