"""Accuracy and latency per ratio, side by side with TVM's FP32 build of the same model.

Latency is the median time of one call at batch 1 (what a serving user sees) measured with TVM's
time evaluator on a separate batch-1 build; accuracy runs at a larger batch for throughput.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import numpy as np
import tvm
from tqdm.auto import tqdm

from ..runtime.build import _as_model, _as_plan, compile, compile_float
from ..calibrate.data import load_data
from ..quant.schedule import STANDARD_LEVELS


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def kl_divergence(ref_logits, logits) -> float:
    """Mean KL(softmax(ref) || softmax(logits)) over samples, in nats."""
    p = _softmax(ref_logits.astype(np.float64))
    q = _softmax(logits.astype(np.float64))
    return float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), axis=-1)))


def _run_float(vm, x, batch, progress, desc):
    outs = []
    for s in tqdm(range(0, x.shape[0], batch), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = x[s:s + batch]
        n = chunk.shape[0]
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], np.float32)])
        outs.append(vm["main"](tvm.runtime.tensor(chunk)).numpy()[:n])
    return np.concatenate(outs)


def _time_vm(vm, args, number, repeat) -> float:
    t = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(*args)
    return float(np.median(t.results)) * 1e3


def evaluate(model, plan, data, ratios: Sequence[float] = STANDARD_LEVELS, batch_size: int = 32,
             latency: bool = True, number: int = 20, repeat: int = 5, progress: bool = True,
             target: str = "llvm") -> Dict:
    """FP32 vs every ratio: top-1 (with labels), top-1 agreement and KL vs FP32, batch-1 latency."""
    plan = _as_plan(plan)
    model = _as_model(model, plan)
    x, labels = load_data(data, model, what="evaluation data")
    batch_size = model.batch_for(min(batch_size, x.shape[0]))
    t0 = time.perf_counter()
    fp32 = compile_float(model, batch_size)
    cm = compile(model, plan, target=target, batch_size=batch_size)
    ref = _run_float(fp32, x, batch_size, progress, "fp32")
    report = {"model": model.name, "samples": int(x.shape[0]), "target": target, "batch_size": batch_size,
              "group_size": plan.group_size, "layers": plan.num_layers,
              "fp32": {"top1": _top1(ref, labels)}, "ratios": []}
    lat = None
    if latency:
        one = model.batch_for(1)          # a graph that pins its batch is timed at that batch
        report["latency_batch"] = one
        fp32_1 = compile_float(model, one)
        cm_1 = compile(model, plan, target=target, batch_size=one)
        x1 = tvm.runtime.tensor(np.ascontiguousarray(x[np.arange(one) % x.shape[0]]))
        report["fp32"]["latency_ms"] = _time_vm(fp32_1, [x1], number, repeat)
        lat = cm_1
    for r in tqdm(list(ratios), desc="ratios", disable=not progress):
        cm.set_ratio(r)
        y = cm(x)
        entry = {"ratio": float(r), "mac_ratio": round(cm.mac_ratio, 6),
                 "channel_ratio": round(plan.channel_ratio(cm.counts), 6), "counts": cm.counts.tolist(),
                 "top1": _top1(y, labels), "agree_top1": float(np.mean(y.argmax(-1) == ref.argmax(-1))),
                 "kl": kl_divergence(ref, y)}
        if lat is not None:
            lat.set_ratio(r)
            entry["latency_ms"] = _time_vm(lat.vm, [x1] + lat.runtime_args(), number, repeat)
            entry["speedup_vs_fp32"] = report["fp32"]["latency_ms"] / entry["latency_ms"]
        report["ratios"].append(entry)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _top1(logits, labels) -> Optional[float]:
    if labels is None:
        return None
    return float(np.mean(logits.argmax(-1) == labels))


def format_report(report: Dict) -> str:
    """A fixed-width table of an `evaluate` report."""
    lines = [f"{report['model']}: {report['samples']} samples, {report['layers']} FlexiQ layers, "
             f"group size {report['group_size']}, target {report['target']}"]
    head = f"{'config':<12}{'4-bit MACs':>11}{'top-1':>9}{'agree':>9}{'KL':>10}{'latency ms':>12}{'vs FP32':>9}"
    lines += [head, "-" * len(head)]

    def pct(v):
        return f"{100 * v:8.2f}%" if v is not None else f"{'-':>9}"

    f = report["fp32"]
    lines.append(f"{'FP32 (TVM)':<12}{'-':>11}{pct(f['top1'])}{'-':>9}{'-':>10}"
                 f"{f.get('latency_ms', float('nan')):>12.3f}{'1.00x':>9}")
    for e in report["ratios"]:
        name = "INT8" if e["ratio"] == 0 else f"ratio {e['ratio']:g}"
        lat = e.get("latency_ms")
        lines.append(f"{name:<12}{100 * e['mac_ratio']:>10.1f}%{pct(e['top1'])}{pct(e['agree_top1'])}"
                     f"{e['kl']:>10.5f}{(lat if lat is not None else float('nan')):>12.3f}"
                     f"{(str(round(e['speedup_vs_fp32'], 2)) + 'x') if lat is not None else '-':>9}")
    return "\n".join(lines)
