"""FlexiQ inside a TVM user's own pipeline: ONNX -> Relax -> my passes -> FlexiQ passes -> tvm.compile -> VM.

This is how a TVM engineer who already has a Relax flow adds FlexiQ to it; nothing but the plan
(made once with `fq.quantize` or `flexiq quantize`) comes from flexiq-tvm's own model loader:

    python examples/existing_pipeline.py                      # the shipped demo CNN and a plan for it
    python examples/existing_pipeline.py --model m.onnx --plan m.plan.json [--check]
    python examples/existing_pipeline.py --model mobilenetv2 \
        --plan benchmarks/gpu_results/plans/mobilenetv2.plan.json --samples 2 --check

`--check` also builds the same model with `fq.compile` and compares the outputs bit for bit at
ratios 0, 0.5 and 1 (the run-time ratio reaches the VM as plain arguments: `plan.runtime_args`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard
from tvm.relax.frontend.onnx import from_onnx

import flexiq_tvm as fq
from flexiq_tvm import transform as fqt

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flexiq_tvm", "assets")


def my_passes() -> tvm.transform.Pass:
    """A user's own Relax passes: constant folding, canonicalisation, operator fusion, and a BYOC-style
    partitioning of conv+bias+relu into composite functions (as a user would for another library)."""
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    conv_bias_relu = is_op("relax.nn.relu")(is_op("relax.add")(conv, is_const()))
    return tvm.transform.Sequential([
        relax.transform.FoldConstant(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FuseOps(),
        relax.transform.FuseOpsByPattern([("mylib.conv2d_bias_relu", conv_bias_relu, {})], bind_constants=False,
                                         annotate_codegen=False),
    ], name="MyPasses")


def build_with_my_pipeline(onnx_path: str, plan, target, batch_size: int = 1, shape_dict=None):
    """ONNX file -> a VM: the user's flow with FlexiQ's two passes added."""
    mod = from_onnx(onnx.load(onnx_path), shape_dict=shape_dict)          # weights are constants
    mod = my_passes()(mod)
    mod = fqt.FlexiQRewrite(plan, batch_size=batch_size)(mod)             # finds the plan's layers, even fused
    tgt = fqt.resolve_target(target)                                       # "llvm" -> FlexiQ's llvm target
    ex = tvm.compile(mod, target=tgt.tvm_target, relax_pipeline=fq.get_pipeline(tgt))
    return relax.VirtualMachine(ex, tgt.device()), tgt.device(), mod


def run(vm, dev, plan, x: np.ndarray, ratio: float, batch_size: int = 1) -> np.ndarray:
    """One output per sample; the ratio is nothing but the VM arguments after the input."""
    # [counts] (+ [bias_row] for plans with bias corrections) (+ the weights lowered for these counts,
    # made by the module's own `flexiq_lower_weights` function on llvm): once per ratio change
    args = plan.runtime_args(ratio, dev, vm)
    outs = [vm["main"](tvm.runtime.tensor(x[i:i + batch_size], dev), *args).numpy()
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def export_mobilenetv2(path: str) -> str:
    """MobileNetV2 to ONNX as benchmarks/gpu_check.py exports it (torchvision ImageNet weights when
    installed, else seeded random weights of the same shapes), for `--model mobilenetv2`."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import mobilenetv2_imagenet as mn

    try:
        net = mn.load_torch_model()
    except Exception:  # noqa: BLE001  weights package missing
        torch.manual_seed(0)
        net = mn.mobilenet_v2().eval()
    return mn.export_onnx(net, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ASSETS, "fashion_cnn.onnx"),
                    help='an ONNX file, or "mobilenetv2" (exported here; use with --plan)')
    ap.add_argument("--plan", default=None, help="plan file (default: quantize the demo CNN on its calibration set)")
    ap.add_argument("--calib", default=os.path.join(ASSETS, "fashion_calib.npz"))
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--check", action="store_true", help="compare bit for bit with fq.compile")
    a = ap.parse_args(argv)

    if a.model == "mobilenetv2":
        a.model = export_mobilenetv2(os.path.join(os.environ.get("TMPDIR", "/tmp"), "flexiq_mnv2.onnx"))
    if a.plan:
        plan = fq.Plan.load(a.plan)
    else:
        plan = fq.quantize(a.model, a.calib, search="range", search_samples=16, progress=False)
    sample_shape = tuple(plan.meta.get("input_shape") or ())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.samples,) + sample_shape).astype(np.float32)

    t0 = time.perf_counter()
    vm, dev, mod = build_with_my_pipeline(a.model, plan, a.target)
    layers = sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith(fqt.LAYER_FUNC_PREFIX))
    print(f"user pipeline: {len(layers)}/{plan.num_layers} plan layers rewritten, built in "
          f"{time.perf_counter() - t0:.1f} s")
    ours = {r: run(vm, dev, plan, x, r) for r in (0.0, 0.5, 1.0)}
    for r, y in ours.items():
        print(f"  ratio {r:.2f}: top-1 of sample 0 = {int(np.argmax(y[0]))}")
    if not a.check:
        return 0
    t0 = time.perf_counter()
    cm = fq.compile(a.model, plan, target=a.target)
    print(f"fq.compile built in {time.perf_counter() - t0:.1f} s")
    ok = True
    for r, y in ours.items():
        cm.set_ratio(r)
        ref = cm(x)
        same = np.array_equal(ref, y)
        ok &= same
        print(f"  ratio {r:.2f}: bit-exact with fq.compile: {same} (max |diff| {np.abs(ref - y).max():.3g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
