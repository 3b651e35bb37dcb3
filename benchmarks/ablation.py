#!/usr/bin/env python3
"""What each step of FlexiQ's channel selection buys, at 4-bit MAC shares 0.5 and 0.75.

Rows (each on the same calibration statistics, seed and group size):
  random            random groups inside layers, random order across layers
  uniform           top 4 bits of every INT8 code (shift 4 everywhere: no bit extraction), range order
  range (max rule)  value-range ranking, METHOD's shift rule e = bitlen(max) - 3
  range             value-range ranking, our MSE shift rule (the default rule)
  layer-level       HAWQ-style: whole layers in 4-bit, ordered by measured sensitivity per MAC
  sensitivity       our one-shot cross-layer ordering from per-layer error curves
  greedy            re-measured after every lowered group
  evolutionary      nested per-level evolution seeded by range and greedy
  + dynamic         evolutionary + activation shifts from the live tensor (METHOD §2)
  + recovery        ... + per-ratio bias correction

Demo model: top-1 on the full Fashion-MNIST test split (or the shipped subset). ImageNet
MobileNetV2 (`--model mobilenet_v2`, weights and photos as in examples/mobilenetv2_imagenet.py):
top-1 agreement with FP32 on photo crops disjoint from the calibration photos. On MobileNetV2
(1,068 groups of 16) greedy lowers 1 % of the MACs per step (`search.GREEDY_LARGE_STEP_SHARE`).

    python3 benchmarks/ablation.py [--subset] [--json out.json]
    python3 benchmarks/ablation.py --model mobilenet_v2 [--work-dir mnv2_work] [--json out.json]
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

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.calibrate.stats import collect_stats  # noqa: E402
from flexiq_tvm.calibrate.data import load_data  # noqa: E402
from flexiq_tvm.quant.build import build_plan  # noqa: E402
from flexiq_tvm.quant.plan import Plan  # noqa: E402
from flexiq_tvm.search.recovery import recover_bias  # noqa: E402
from flexiq_tvm.search.driver import run_search  # noqa: E402

SHARES = (0.5, 0.75)


def copy(plan: Plan) -> Plan:
    return Plan.loads(plan.dumps())


def random_plan(plan: Plan, seed: int) -> Plan:
    rng = np.random.default_rng(seed)
    p = copy(plan)
    p.layers = [l.reorder_groups(rng.permutation(l.n_groups)) for l in p.layers]
    steps = np.concatenate([[i] * l.n_groups for i, l in enumerate(p.layers)]).astype(int)
    from flexiq_tvm.search.driver import _set_schedule
    _set_schedule(p, rng.permutation(steps).tolist())
    return p


def layer_level_plan(plan: Plan) -> Plan:
    """Whole layers, cheapest measured full-lowering error per MAC first."""
    from flexiq_tvm.search.driver import _set_schedule
    p = copy(plan)
    err = p.meta["layer_error_at_full_4bit"]
    order = sorted(range(p.num_layers), key=lambda i: (err[p.layers[i].name] / p.layers[i].group_macs.sum(), i))
    _set_schedule(p, [i for i in order for _ in range(p.layers[i].n_groups)])
    return p


def evaluate(model, plan, x, labels, ref_logits, batch):
    cm = fq.compile(model, plan, batch_size=batch)
    out = {}
    for r in SHARES:
        cm.set_ratio(r)
        y = cm(x)
        score = float(np.mean(y.argmax(1) == labels)) if labels is not None else \
            float(np.mean(y.argmax(1) == ref_logits.argmax(1)))
        out[r] = {"score": score, "mac_ratio": cm.mac_ratio}
    cm.set_ratio(0.0)
    y = cm(x)
    out[0.0] = {"score": float(np.mean(y.argmax(1) == labels)) if labels is not None else
                float(np.mean(y.argmax(1) == ref_logits.argmax(1))), "mac_ratio": 0.0}
    return out


def ablate(model, calib, x, labels, *, group_size, seed, samples, batch, generations, progress):
    import tvm
    fp32 = fq.compile_float(model, batch)
    ref = np.concatenate([fp32["main"](tvm.runtime.tensor(np.ascontiguousarray(
        np.concatenate([x[s:s + batch], np.zeros((max(0, s + batch - len(x)),) + x.shape[1:], np.float32)]))))
        .numpy()[: min(batch, len(x) - s)] for s in range(0, len(x), batch)])
    t = time.perf_counter()
    stats = collect_stats(model, calib, seed=seed, progress=progress)
    times = {"calibration": time.perf_counter() - t}
    base = {rule: build_plan(model.specs, stats, group_size=group_size, shift_rule=rule, seed=seed,
                             meta={"model": model.name})
            for rule in ("mse", "max", "uniform")}
    rows = {}
    run_search(model, base["mse"], calib, "range", seed=seed, samples=samples, progress=progress)  # layer errors
    rows["random"] = random_plan(base["mse"], seed)
    rows["uniform"] = base["uniform"]
    rows["range (max rule)"] = base["max"]
    rows["range"] = base["mse"]
    rows["layer-level"] = layer_level_plan(base["mse"])
    for search in ("sensitivity", "greedy", "evolutionary"):
        p = copy(base["mse"])
        t = time.perf_counter()
        run_search(model, p, calib, search, seed=seed, samples=samples, generations=generations, progress=progress)
        times[search] = time.perf_counter() - t
        rows[search] = p
    evo = rows["evolutionary"]
    last = evo
    if hasattr(evo, "dynamic"):
        dyn = copy(evo)
        dyn.dynamic = True
        rows["+ dynamic"] = dyn
        last = dyn
    rec = copy(last)
    t = time.perf_counter()
    recover_bias(model, rec, calib, samples=samples, seed=seed, progress=progress)
    times["recovery"] = time.perf_counter() - t
    rows["+ recovery"] = rec
    results = {}
    for name, plan in rows.items():
        results[name] = evaluate(model, plan, x, labels, ref, batch)
        if progress:
            print(f"  {name:<18} " + "  ".join(f"{r}: {100 * v['score']:.2f}% ({100 * v['mac_ratio']:.0f}% MACs)"
                                               for r, v in results[name].items()), flush=True)
    return results, times


def format_table(title, results, times, metric):
    lines = [title, f"{'selection':<20}{'INT8':>9}" + "".join(f"{'@' + str(r):>10}{'4b MACs':>9}" for r in SHARES)]
    for name, res in results.items():
        lines.append(f"{name:<20}{100 * res[0.0]['score']:>8.2f}%" + "".join(
            f"{100 * res[r]['score']:>9.2f}%{100 * res[r]['mac_ratio']:>8.1f}%" for r in SHARES))
    lines.append(f"({metric}; search seconds on this machine: " +
                 ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + ")")
    return "\n".join(lines)


def full_fashion_test():
    """The full 10k Fashion-MNIST test split when the Debian package is installed (less noise than
    the shipped 2,000-image subset), preprocessed like the demo model's training."""
    import gzip
    import os
    for d in ("/usr/share/datasets/fashion-mnist", os.environ.get("FASHION_MNIST_DIR", "")):
        img, lab = Path(d) / "t10k-images-idx3-ubyte.gz", Path(d) / "t10k-labels-idx1-ubyte.gz"
        if d and img.exists() and lab.exists():
            x = np.frombuffer(gzip.open(img).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
            y = np.frombuffer(gzip.open(lab).read(), np.uint8, offset=8).astype(np.int64)
            return ((x.astype(np.float32) / 255.0 - 0.2860) / 0.3530).astype(np.float32), y
    return None, None


def demo_model_and_data(subset: bool = False, model_file: str = "fashion_cnn.onnx"):
    """(a shipped Fashion-MNIST model, default the demo CNN; the 512 calibration inputs; test inputs,
    labels): the full test split when installed, else (or with `subset`) the shipped 2,000 images."""
    assets = REPO / "flexiq_tvm" / "assets"
    model = fq.load_model(str(assets / model_file))
    calib, _ = load_data(str(assets / "fashion_calib.npz"), model)
    x, labels = full_fashion_test() if not subset else (None, None)
    if x is None:
        x, labels = load_data(str(assets / "fashion_test.npz"), model)
    return model, calib, x, labels


def mobilenet_rows(args):
    """The same rows on ImageNet MobileNetV2: 56 calibration crops from 7 photos, 112 evaluation
    crops from 14 others, agreement with FP32 (there are no ImageNet labels here)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "examples"))
    import mobilenetv2_imagenet as mnv2
    from flexiq_tvm.calibrate.images import ImageFolder

    ns = SimpleNamespace(threads=2, weights=None, photos=None, calib_crops=8, eval_crops=8, seed=args.seed,
                         frontend="onnx")
    model, _, calib_dir, eval_dir = mnv2.prepare(Path(args.work_dir), ns)
    calib, _ = ImageFolder(str(calib_dir)).load(model)
    x, _ = ImageFolder(str(eval_dir)).load(model)
    gs, samples = args.group_size or 16, args.samples or 16
    print(f"MobileNetV2 ({len(x)} evaluation crops, group size {gs}, {samples} search samples)", flush=True)
    res, times = ablate(model, calib, x, None, group_size=gs, seed=args.seed, samples=samples,
                        batch=16, generations=args.generations, progress=not args.quiet)
    print(format_table("MobileNetV2: top-1 agreement with FP32", res, times, "agreement with FP32 on photo crops"))
    return {"results": res, "seconds": times, "metric": "top1 agreement with FP32"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group-size", type=int, help="default 8 (demo), 16 (MobileNetV2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, help="calibration samples scored by the searches "
                    "(default 512 for the demo, 16 for MobileNetV2)")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--subset", action="store_true", help="use the shipped 2,000-image test subset even when "
                    "the full test split is installed")
    ap.add_argument("--json")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--model", choices=("fashion_cnn", "mobilenet_v2"), default="fashion_cnn")
    ap.add_argument("--work-dir", default="mnv2_work", help="MobileNetV2: photo crops and ONNX go here")
    args = ap.parse_args(argv)
    out = {}
    if args.model == "mobilenet_v2":
        out["mobilenet_v2"] = mobilenet_rows(args)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        return
    model, calib, x, labels = demo_model_and_data(args.subset)
    gs, samples = args.group_size or 8, args.samples or 512
    print(f"demo CNN (Fashion-MNIST, {len(x)} test images, group size {gs})", flush=True)
    res, times = ablate(model, calib, x, labels, group_size=gs, seed=args.seed, samples=samples,
                        batch=100, generations=args.generations, progress=not args.quiet)
    print(format_table("demo CNN: top-1", res, times, "top-1 on labelled test images"))
    out["fashion_cnn"] = {"results": res, "seconds": times, "metric": "top1"}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
