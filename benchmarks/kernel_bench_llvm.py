"""Time the FlexiQ llvm conv/dense kernels vs TVM's default FP32 build and ONNX Runtime FP32.

    python3 benchmarks/kernel_bench_llvm.py [--quick] [--only NAME_SUBSTR]

Columns (microseconds, median of repeats, 2 threads):
  int8_conv   the conv2d_int8 / dense_int8 kernel alone (float epilogue)
  int8_layer  quantize_act + lower_weight + conv (what one FlexiQ layer costs per call), k = half
  tvm_fp32    R.nn.conv2d (+bias) built with relax.get_default_pipeline(target) (untuned TVM)
  ort_fp32    ONNX Runtime Conv/Gemm, best of intra_op_num_threads = 1 and 2
and the ratios tvm_fp32 / int8_conv and ort_fp32 / int8_conv (>1: FlexiQ kernel faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from flexiq_tvm.schedules import compute as fc  # noqa: E402
from flexiq_tvm.schedules import llvm as fl  # noqa: E402

TARGET = fl.default_target()
DEV = tvm.cpu()

# name, N, C, H, W, O, K, stride, pad, groups    (dense: K = 0, H = W = 1)
SHAPES = [
    ("fm.conv1 1->16 3x3 28", 1, 1, 28, 28, 16, 3, 1, 1, 1),
    ("fm.conv 16->16 3x3 28", 1, 16, 28, 28, 16, 3, 1, 1, 1),
    ("fm.conv 16->32 3x3 s2", 1, 16, 28, 28, 32, 3, 2, 1, 1),
    ("fm.conv 16->32 1x1 s2", 1, 16, 28, 28, 32, 1, 2, 0, 1),
    ("fm.conv 32->32 3x3 14", 1, 32, 14, 14, 32, 3, 1, 1, 1),
    ("fm.conv 32->64 3x3 s2", 1, 32, 14, 14, 64, 3, 2, 1, 1),
    ("fm.conv 64->64 3x3 7", 1, 64, 7, 7, 64, 3, 1, 1, 1),
    ("fm.dense 64->10", 1, 64, 1, 1, 10, 0, 1, 0, 1),
    ("mbv2.dw 3x3 144 56", 1, 144, 56, 56, 144, 3, 1, 1, 144),
    ("mbv2.pw 1x1 144->24 56", 1, 144, 56, 56, 24, 1, 1, 0, 1),
]


def with_batch(shapes, n):
    return [(f"{s[0]} N={n}", n) + tuple(s[2:]) for s in shapes]


def timeit_tvm(f, args, min_ms=100, repeat=5):
    te_ = f.time_evaluator(f.name if hasattr(f, "name") else "main", DEV, min_repeat_ms=min_ms,
                           repeat=repeat)
    return float(np.median(te_(*args).results)) * 1e6


def time_lib(lib, name, args, min_ms=100, repeat=5):
    ev = lib.jit().time_evaluator(name, DEV, min_repeat_ms=min_ms, repeat=repeat)
    return float(np.median(ev(*args).results)) * 1e6


def bench_int8(shape, min_ms):
    name, N, C, H, W, O, K, st, p, g = shape
    rng = np.random.default_rng(0)
    L, li, ng = 1, 0, 4
    unsigned = True
    if K == 0:  # dense
        fq = fc.quantize_act((N, C), 1, 0, 0.05, unsigned, li, L)
        fw = fc.lower_weight((O, C), 1, ng, li, L)
        fwp = fc.lower_weight((O, C), 1, ng, li, L, w_prepacked=True)
        fcv = fc.dense_int8((N, C), (O, C), unsigned, "float")
        x = rng.normal(size=(N, C)).astype(np.float32)
        w = rng.integers(-127, 128, size=(O, C)).astype(np.int8)
        qshape, yshape = (N, C), (N, O)
    else:
        Cg = C // g
        fq = fc.quantize_act((N, C, H, W), 1, p, 0.05, unsigned, li, L)
        fw = fc.lower_weight((O, Cg, K, K), g, ng, li, L)
        fwp = fc.lower_weight((O, Cg, K, K), g, ng, li, L, w_prepacked=True)
        fcv = fc.conv2d_int8((N, C, H + 2 * p, W + 2 * p), (O, Cg, K, K), st, 1, g, unsigned,
                             "float")
        x = rng.normal(size=(N, C, H, W)).astype(np.float32)
        w = rng.integers(-127, 128, size=(O, Cg, K, K)).astype(np.int8)
        OH = (H + 2 * p - K) // st + 1
        qshape, yshape = (N, C, H + 2 * p, W + 2 * p), (N, O, OH, OH)
    ob = int(fw.attrs["flexiq.ob"])
    if K == 0:
        wl_shape = fc.dense_weight_layout_shape((O, C))
    else:
        wl_shape = fc.conv_weight_layout_shape((O, C // g, K, K), g)
    mod = tvm.IRModule({
        "q": fl.schedule_llvm(fq, TARGET).with_attr("global_symbol", "q"),
        "wl": fl.schedule_llvm(fw, TARGET).with_attr("global_symbol", "wl"),
        "wlp": fl.schedule_llvm(fwp, TARGET).with_attr("global_symbol", "wlp"),
        "conv": fl.schedule_llvm(fcv, TARGET).with_attr("global_symbol", "conv"),
    })
    lib = tvm.compile(mod, target=TARGET)
    counts = np.array([ng // 2], np.int32)
    rank = (rng.permutation(C) * ng // C).astype(np.int32)
    shift = rng.integers(0, 5, size=C).astype(np.int32)
    wshift = rng.integers(0, 5, size=(O, ng)).astype(np.int32)
    T = tvm.runtime.tensor
    tq = tvm.runtime.empty(qshape, "uint8")
    twl = tvm.runtime.empty(wl_shape, "int8")
    ty = tvm.runtime.empty(yshape, "float32")
    tx, tc, tr, ts, tw, tws = T(x), T(counts), T(rank), T(shift), T(w), T(wshift)
    tsc, tb = T(np.full(O, 1e-3, np.float32)), T(np.zeros(O, np.float32))
    t_q = time_lib(lib, "q", [tx, tc, tr, ts, tq], min_ms)
    t_w = time_lib(lib, "wl", [tw, tc, tr, tws, twl], min_ms)
    t_c = time_lib(lib, "conv", [tq, twl, tsc, tb, ty], min_ms)
    tw_pre = T(fc.prepack_weight(w, 1 if K == 0 else g))
    t_wp = time_lib(lib, "wlp", [tw_pre, tc, tr, tws, twl], min_ms)
    return t_c, t_q, t_w, t_wp


def bench_tvm_fp32(shape, min_ms):
    name, N, C, H, W, O, K, st, p, g = shape
    bb = relax.BlockBuilder()
    if K == 0:
        xv = relax.Var("x", relax.TensorType((N, C), "float32"))
        wv = relax.Var("w", relax.TensorType((C, O), "float32"))
        bv = relax.Var("b", relax.TensorType((O,), "float32"))
        with bb.function("main", [xv, wv, bv]):
            with bb.dataflow():
                y = bb.emit(relax.op.matmul(xv, wv))
                y = bb.emit_output(relax.op.add(y, bv))
            bb.emit_func_output(y)
        args = [np.random.rand(N, C), np.random.rand(C, O), np.random.rand(O)]
    else:
        xv = relax.Var("x", relax.TensorType((N, C, H, W), "float32"))
        wv = relax.Var("w", relax.TensorType((O, C // g, K, K), "float32"))
        bv = relax.Var("b", relax.TensorType((1, O, 1, 1), "float32"))
        with bb.function("main", [xv, wv, bv]):
            with bb.dataflow():
                y = bb.emit(relax.op.nn.conv2d(xv, wv, strides=st, padding=p, groups=g))
                y = bb.emit_output(relax.op.add(y, bv))
            bb.emit_func_output(y)
        args = [np.random.rand(N, C, H, W), np.random.rand(O, C // g, K, K),
                np.random.rand(1, O, 1, 1)]
    ex = tvm.compile(bb.get(), target=TARGET, relax_pipeline=relax.get_default_pipeline(TARGET))
    vm = relax.VirtualMachine(ex, DEV)
    targs = [tvm.runtime.tensor(a.astype(np.float32)) for a in args]
    ev = vm.time_evaluator("main", DEV, min_repeat_ms=min_ms, repeat=3)
    return float(np.median(ev(*targs).results)) * 1e6


def bench_ort(shape, min_ms, threads=2):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    name, N, C, H, W, O, K, st, p, g = shape
    rng = np.random.default_rng(0)
    if K == 0:
        w = rng.normal(size=(O, C)).astype(np.float32)
        b = rng.normal(size=(O,)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        xshape, yshape = [N, C], [N, O]
    else:
        w = rng.normal(size=(O, C // g, K, K)).astype(np.float32)
        b = rng.normal(size=(O,)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[K, K],
                                strides=[st, st], pads=[p, p, p, p], group=g)
        OH = (H + 2 * p - K) // st + 1
        xshape, yshape = [N, C, H, W], [N, O, OH, OH]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape)],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.normal(size=xshape).astype(np.float32)
    for _ in range(10):
        sess.run(None, {"x": x})
    res = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while True:
            sess.run(None, {"x": x})
            n += 1
            el = time.perf_counter() - t0
            if el * 1e3 >= min_ms:
                break
        res.append(el / n)
    return float(np.median(res)) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timing, N=1 only")
    ap.add_argument("--only", default=None)
    ap.add_argument("--no-tvm-fp32", action="store_true")
    args = ap.parse_args()
    min_ms = 30 if args.quick else 100
    shapes = with_batch(SHAPES, 1)
    if not args.quick:
        shapes += with_batch([s for s in SHAPES if s[0].startswith("fm.")], 32)
    if args.only:
        shapes = [s for s in shapes if args.only in s[0]]
    print(f"target: {TARGET}")
    print("times in us (median of repeats); ratios > 1 mean the INT8 kernel is faster; "
          "ort = best of 1 and 2 intra-op threads")
    print("int8_layer = quantize_act + lower_weight + conv;  layer_pre = same with a prepacked "
          "weight (lower_weight(w_prepacked=True))")
    hdr = (f"{'layer':30s} {'int8_conv':>9s} {'int8_layer':>10s} {'layer_pre':>9s} "
           f"{'tvm_fp32':>9s} {'ort_fp32':>9s} {'tvm/conv':>8s} {'ort/conv':>8s} "
           f"{'ort/layer':>9s}  breakdown")
    print(hdr)
    print("-" * len(hdr))
    for s in shapes:
        t_c, t_q, t_w, t_wp = bench_int8(s, min_ms)
        t_tvm = float("nan") if args.no_tvm_fp32 else bench_tvm_fp32(s, min_ms)
        t_ort = min(bench_ort(s, min_ms, 1), bench_ort(s, min_ms, 2))
        lay, lay_p = t_c + t_q + t_w, t_c + t_q + t_wp
        print(f"{s[0]:30s} {t_c:9.1f} {lay:10.1f} {lay_p:9.1f} {t_tvm:9.1f} {t_ort:9.1f} "
              f"{t_tvm / t_c:8.1f} {t_ort / t_c:8.2f} {t_ort / lay:9.2f}  "
              f"(q {t_q:.1f}, w {t_w:.1f}, w_pre {t_wp:.1f})", flush=True)


if __name__ == "__main__":
    main()
