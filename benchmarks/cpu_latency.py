"""End-to-end CPU latency, accuracy and size: FlexiQ (every ratio) vs TVM FP32 vs ONNX Runtime.

    python3 benchmarks/cpu_latency.py [--json OUT] [--batch-sizes 1 32] [--ratios 0 0.25 0.5 0.75 1]
                                      [--model M.onnx --calib C.npz [--test T.npz]]

In one process, on one machine, for each batch size B it builds and times side by side:

  TVM FP32         fq.compile_float(model, B): TVM's default Relax pipeline (untuned, naive loops)
  FlexiQ r=...     ONE fq.compile(model, plan, batch_size=B) artifact; cm.set_ratio(r) between timings
                   (r=0 is plain INT8, r>0 bit-extracts that fraction of MACs to 4-bit operands)
  ORT FP32         onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads = cores
  ORT INT8 QDQ     quantize_static(QDQ, per_channel=True, weights QInt8, activations QUInt8 by
                   default, i.e. U8S8, ORT's fast path on x86 (VPDPBUSD/VPMADDUBSW); --ort-activation)

Timing: every config gets warm-up calls, then R interleaved rounds (the config order rotates each
round); in each round a config runs a block of `number` back-to-back calls (number chosen so a block
lasts >= --min-block-s) and the block's mean is that round's time. Reported: the median over rounds,
per batch and per sample, the best round ("best ms/b": the least-disturbed block) and the IQR of
the rounds in % of the median; speedups are medians over rounds of the PAIRED per-round ratio
baseline_time / config_time (>1 = faster than the baseline), which cancels most of the drift of a
shared, noisy machine. TVM configs are timed with TVM's time_evaluator (C++ loop); ORT with
run_with_iobinding on a pre-bound input (Python loop, a few microseconds of overhead per call).

Also measured: the cost of cm.set_ratio (alternating two levels; and first use of a new ratio) and
cm.set_counts; top-1 accuracy of every config on the test set; artifact and weight sizes.

TVM's runtime thread pool defaults to hardware_concurrency / 2 on x86 (1 thread on a 2-vCPU VM), so
this script sets TVM_NUM_THREADS to --threads (default: the core count, unless TVM_NUM_THREADS is
already set) before importing TVM, and ORT's intra_op_num_threads to --threads too.
S8S8 QDQ (--ort-activation qint8) measured 2-3x slower than U8S8 in ORT 1.32 on a Xeon with
AVX512-VNNI, hence the U8S8 default.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.path.join(ROOT, "flexiq_tvm", "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "fashion_cnn.onnx")
DEFAULT_CALIB = os.path.join(ASSETS, "fashion_calib.npz")
DEFAULT_TEST = os.path.join(ASSETS, "fashion_test.npz")

T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="ONNX model (default: the shipped fashion_cnn.onnx)")
    p.add_argument("--calib", default=None, help="calibration .npz with 'inputs' (default: the shipped "
                   "fashion_calib.npz when --model is the default)")
    p.add_argument("--test", default=None, help="test .npz with 'inputs' and 'labels' for top-1 (default: the "
                   "shipped fashion_test.npz when --model is the default, else no accuracy)")
    p.add_argument("--acc-samples", type=int, default=0, help="use only the first N test samples (0: all)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per batch size")
    p.add_argument("--min-block-s", type=float, default=0.1, help="minimum seconds per timed block")
    p.add_argument("--warmup-s", type=float, default=0.3, help="warm-up seconds per config (>= 2 calls)")
    p.add_argument("--threads", type=int, default=None, help="threads for TVM and ORT (default: cores)")
    p.add_argument("--ort-activation", choices=["quint8", "qint8"], default="quint8",
                   help="ORT static QDQ activation type (weights are always QInt8, per channel)")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows")
    p.add_argument("--artifact-dir", default=None, help="keep exported artifacts here (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="OUT", help="write all results to this JSON file")
    a = p.parse_args(argv)
    default_model = os.path.abspath(a.model) == os.path.abspath(DEFAULT_MODEL)
    if a.calib is None:
        if not default_model:
            p.error("--calib is required with --model")
        a.calib = DEFAULT_CALIB
    if a.test is None and default_model:
        a.test = DEFAULT_TEST
    if 0.0 not in a.ratios:
        a.ratios = [0.0] + a.ratios
    a.ratios = sorted(set(a.ratios))
    a.threads_given = a.threads is not None
    a.threads = a.threads or cores()
    return a


# ---- timing -------------------------------------------------------------------------------------
class Runner:
    """One config at one batch size: `block(number)` -> mean seconds per call of `number` calls."""

    def __init__(self, name, kind, block, run_once=None, **info):
        self.name, self.kind, self.block, self.run_once, self.info = name, kind, block, run_once, info
        self.number = 1
        self.rounds = []
        self.error = None


def tvm_block(vm, args):
    import tvm

    def block(number):
        ev = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=1)
        return float(ev(*args).results[0])   # time_evaluator makes one untimed warm-up call first
    return block


def flexiq_block(cm, ratio, x):
    def block(number):
        cm.set_ratio(ratio)
        return cm.time_batch(number=number, repeat=1, x=x)   # same time_evaluator, current counts
    return block


def ort_block(sess, x):
    binding = sess.io_binding()
    binding.bind_cpu_input(sess.get_inputs()[0].name, x)
    binding.bind_output(sess.get_outputs()[0].name)

    def block(number):
        sess.run_with_iobinding(binding)      # untimed warm-up call, like TVM's time_evaluator
        t = time.perf_counter()
        for _ in range(number):
            sess.run_with_iobinding(binding)
        return (time.perf_counter() - t) / number
    return block


def measure(runners, rounds, min_block_s, warmup_s, desc):
    live = []
    for r in runners:
        try:
            t1 = r.block(1)
            n = max(1, int(math.ceil(warmup_s / max(t1, 1e-7))))
            t1 = min(t1, r.block(min(n, 1000)))
            r.number = max(1, int(math.ceil(min_block_s / max(t1, 1e-7))))
            live.append(r)
        except Exception as e:  # e.g. an ONNX model with a static batch axis
            r.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"  {r.name}: skipped ({r.error})")
    for k in range(rounds):
        order = live[k % len(live):] + live[:k % len(live)]
        for r in order:
            r.rounds.append(r.block(r.number))
            time.sleep(0.005)
        log(f"  {desc}: round {k + 1}/{rounds}")


def _per_call(fn, budget_s, chunk):
    """Seconds per call of fn(), running whole chunks of `chunk` calls for about budget_s."""
    n, t = 0, time.perf_counter()
    while True:
        for _ in range(chunk):
            fn()
        n += chunk
        el = time.perf_counter() - t
        if el >= budget_s:
            return el / n


def switch_costs(cm, plan, levels, budget_s=0.3, repeat=5):
    """Microseconds per cm.set_ratio (cached levels, alternating), per first use of a new ratio,
    and per cm.set_counts (alternating two count vectors); medians of `repeat` timed loops."""
    a, b = levels[0], levels[-1]
    ca = np.asarray(plan.counts_for_ratio(a), dtype=np.int32)
    cb = np.asarray(plan.counts_for_ratio(b), dtype=np.int32)
    cm.set_ratio(a)
    cm.set_ratio(b)

    def two_ratios():
        cm.set_ratio(a)
        cm.set_ratio(b)

    def two_counts():
        cm.set_counts(ca)
        cm.set_counts(cb)

    res = {"alternating": [a, b]}
    res["set_ratio_us"] = float(np.median([_per_call(two_ratios, budget_s, 1000) / 2 for _ in range(repeat)])) * 1e6
    res["set_counts_us"] = float(np.median([_per_call(two_counts, budget_s, 50) / 2 for _ in range(repeat)])) * 1e6
    fresh = [float(v) for v in np.linspace(0.0005, 0.9995, 400) if float(v) not in levels]  # never cached
    t = time.perf_counter()
    for v in fresh:
        cm.set_ratio(v)
    res["set_ratio_first_use_us"] = (time.perf_counter() - t) / len(fresh) * 1e6
    cm.set_ratio(0.0)
    return res


class quiet_stderr:
    """Silences file descriptor 2 (TVM's C++ log) inside the block."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


# ---- ONNX Runtime ---------------------------------------------------------------------------------
def ort_session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_quantize(src, calib_inputs, input_name, workdir, activation):
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, x, batch=64):
            self.it = iter([{input_name: x[i:i + batch]} for i in range(0, len(x), batch)])

        def get_next(self):
            return next(self.it, None)

    pre = os.path.join(workdir, "model_pre.onnx")
    out = os.path.join(workdir, f"model_qdq_{activation}.onnx")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        try:
            quant_pre_process(src, pre)
        except Exception as e:
            log(f"  quant_pre_process failed ({type(e).__name__}); quantizing the original model")
            pre = src
        quantize_static(pre, out, Reader(calib_inputs), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if activation == "quint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(level)
    return out


# ---- accuracy ------------------------------------------------------------------------------------
def run_chunks(fn, x, batch, static):
    outs = []
    for s in range(0, x.shape[0], batch):
        chunk = x[s:s + batch]
        n = chunk.shape[0]
        if static and n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], np.float32)])
        outs.append(np.asarray(fn(chunk))[:n])
    return np.concatenate(outs)


def top1(logits, labels):
    return float(np.mean(logits.reshape(logits.shape[0], -1).argmax(-1) == labels))


# ---- sizes ---------------------------------------------------------------------------------------
def weight_bytes(model, plan):
    fp32_w = sum(int(s.weight.size) * 4 for s in model.specs)
    bias = sum(int(s.bias.size) * 4 for s in model.specs)
    int8_w = sum(int(s.weight.size) for s in model.specs)
    # what the artifact stores per layer (flexiq_rewrite): rank[C], act_shift[C], weight_shift[O, G], int32
    shift_stored = sum(4 * (2 * l.in_channels + l.weight_shift.size) for l in plan.layers)
    # the plan's shift tables at one byte per entry (values 0..4): act_shift[G] + weight_shift[O, G]
    shift_packed = sum(l.act_shift.size + l.weight_shift.size for l in plan.layers)
    scales = sum(4 * l.out_channels for l in plan.layers)   # float32 dequant scale per output channel
    return {"fp32_weights": fp32_w, "bias_fp32": bias, "int8_weights": int8_w,
            "shift_tables_int32_as_stored": shift_stored, "shift_tables_uint8": shift_packed,
            "dequant_scales_fp32": scales,
            "flexiq_total_as_stored": int8_w + shift_stored + scales + bias,
            "fp32_total": fp32_w + bias}


def float_executable(model, batch):
    """The same build as fq.compile_float (batch bound, TVM default pipeline), as an Executable."""
    import tvm
    from tvm import relax

    from flexiq_tvm.calibrate.stats import default_target

    main = model.mod["main"]
    n = main.params[0].ty.shape.values[0]
    mod = model.mod
    if not isinstance(n, tvm.tirx.IntImm):
        mod = tvm.IRModule({"main": main.bind_symbolic_vars({n: int(batch)})})
    target = default_target()
    return tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))


# ---- report --------------------------------------------------------------------------------------
def fmt_x(v):
    return f"{v:.2f}x" if v is not None and math.isfinite(v) else "-"


def fmt_pct(v):
    return f"{100 * v:.2f}%" if v is not None else "-"


def format_tables(res) -> str:
    lines = []
    for bres in res["batches"]:
        B = bres["batch_size"]
        lines.append(f"\nbatch {B}: median of {res['settings']['rounds']} interleaved rounds; "
                     f"speedup = median paired baseline/config time (>1: faster); IQR = spread of rounds")
        head = (f"{'config':<22}{'4b MACs':>8}{'ms/batch':>10}{'ms/sample':>10}{'best ms/b':>10}{'IQR':>6}"
                f"{'vs TVM FP32':>13}{'vs ORT FP32':>13}{'top-1':>9}")
        lines += [head, "-" * len(head)]
        for c in bres["configs"]:
            mac = f"{100 * c['mac_ratio']:.1f}%" if c.get("mac_ratio") is not None else "-"
            if c.get("ms_batch") is None:
                lines.append(f"{c['name']:<22}{mac:>8}{'n/a':>10}{'':>10}{'':>10}{'':>6}{'':>13}{'':>13}"
                             f"{fmt_pct(c.get('top1')):>9}")
                continue
            lines.append(f"{c['name']:<22}{mac:>8}{c['ms_batch']:>10.3f}{c['ms_sample']:>10.4f}{c['best_ms_batch']:>10.3f}"
                         f"{c['iqr_pct']:>5.0f}%{fmt_x(c.get('speedup_vs_tvm_fp32')):>13}"
                         f"{fmt_x(c.get('speedup_vs_ort_fp32')):>13}{fmt_pct(c.get('top1')):>9}")
    sw = res.get("switch_cost")
    if sw:
        lines.append(f"\nratio switch (batch {sw['batch_size']} artifact): set_ratio {sw['set_ratio_us']:.2f} us "
                     f"(cached levels {sw['alternating'][0]:g} <-> {sw['alternating'][1]:g}); first use of a "
                     f"new ratio {sw['set_ratio_first_use_us']:.1f} us; set_counts {sw['set_counts_us']:.1f} us")
    s = res.get("sizes")
    if s:
        w = s["weights"]
        lines.append("\nsizes (bytes):")
        for k, v in s["files"].items():
            lines.append(f"  {k:<34}{v:>12,}")
        lines.append(f"  {'FP32 weights (+ FP32 bias)':<34}{w['fp32_weights']:>12,}  (+{w['bias_fp32']:,})")
        lines.append(f"  {'INT8 weights':<34}{w['int8_weights']:>12,}  "
                     f"({w['int8_weights'] / w['fp32_weights']:.2f}x of FP32)")
        lines.append(f"  {'shift tables, int32 as stored':<34}{w['shift_tables_int32_as_stored']:>12,}  "
                     f"(rank + act_shift per channel, weight_shift per output x group)")
        lines.append(f"  {'shift tables, 1 byte/entry':<34}{w['shift_tables_uint8']:>12,}")
        lines.append(f"  {'FlexiQ total as stored':<34}{w['flexiq_total_as_stored']:>12,}  "
                     f"(INT8 w + int32 shifts + FP32 scales + FP32 bias; "
                     f"{w['flexiq_total_as_stored'] / w['fp32_total']:.2f}x of FP32 w + bias)")
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.threads_given or "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, ROOT)

    import tvm

    import flexiq_tvm as fq
    from flexiq_tvm.calibrate.data import load_npz

    res = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "machine": {"cpu": cpu_model(), "cores": cores(), "loadavg_start": loadavg(),
                       "platform": platform.platform()},
           "versions": {"python": platform.python_version(), "tvm": tvm.__version__, "numpy": np.__version__,
                        "flexiq_tvm": fq.__version__},
           "settings": {"model": os.path.relpath(args.model, ROOT), "calib": os.path.relpath(args.calib, ROOT),
                        "test": os.path.relpath(args.test, ROOT) if args.test else None,
                        "batch_sizes": args.batch_sizes, "ratios": args.ratios, "rounds": args.rounds,
                        "min_block_s": args.min_block_s, "warmup_s": args.warmup_s,
                        "threads": args.threads, "TVM_NUM_THREADS": os.environ["TVM_NUM_THREADS"],
                        "ort_activation": None if args.no_ort else args.ort_activation},
           "batches": []}
    tvm_threads = tvm.get_global_func("runtime.NumThreads", allow_missing=True)
    if tvm_threads is not None:
        res["settings"]["tvm_runtime_threads"] = int(tvm_threads())
    log(f"{res['machine']['cpu']}, {res['machine']['cores']} cores, load {res['machine']['loadavg_start']}; "
        f"threads: TVM {res['settings'].get('tvm_runtime_threads')}, ORT {args.threads}")

    model = fq.load_model(args.model)
    calib_x, _ = load_npz(args.calib, model.input_name)
    calib_x = model.check_inputs(calib_x, "calibration data")
    test_x = test_y = None
    if args.test:
        test_x, test_y = load_npz(args.test, model.input_name)
        test_x = model.check_inputs(test_x, "test data")
        if args.acc_samples:
            test_x, test_y = test_x[:args.acc_samples], (None if test_y is None else test_y[:args.acc_samples])
        res["settings"]["test_samples"] = int(test_x.shape[0])
    log(f"loaded {model.name}: {len(model.specs)} FlexiQ layers; quantizing on {calib_x.shape[0]} samples")
    t = time.perf_counter()
    plan = fq.quantize(model, calib_x, ratios=args.ratios, progress=False)
    res["quantize_s"] = round(time.perf_counter() - t, 2)

    workdir_obj = None
    if args.artifact_dir:
        os.makedirs(args.artifact_dir, exist_ok=True)
        workdir = args.artifact_dir
    else:
        workdir_obj = tempfile.TemporaryDirectory(prefix="flexiq_cpu_latency_")
        workdir = workdir_obj.name

    qdq_path = None
    if not args.no_ort:
        import onnxruntime as ort

        res["versions"]["onnxruntime"] = ort.__version__
        log(f"ORT static QDQ quantization (activations {args.ort_activation}, weights qint8 per channel)")
        t = time.perf_counter()
        qdq_path = ort_quantize(args.model, calib_x, model.input_name, workdir, args.ort_activation)
        res["ort_quantize_s"] = round(time.perf_counter() - t, 2)
        ort_fp32 = ort_session(args.model, args.threads)
        ort_int8 = ort_session(qdq_path, args.threads)
        ort_name = f"ORT INT8 QDQ ({'U8S8' if args.ort_activation == 'quint8' else 'S8S8'})"

    builds = {}
    sizes = {"files": {}}
    for B in args.batch_sizes:
        log(f"batch {B}: compiling FlexiQ and TVM FP32")
        t = time.perf_counter()
        cm = fq.compile(model, plan, target="llvm", batch_size=B)
        t_cm = time.perf_counter() - t
        t = time.perf_counter()
        fvm = fq.compile_float(model, batch_size=B)
        t_fvm = time.perf_counter() - t
        builds[B] = (cm, fvm)
        reps = -(-B // calib_x.shape[0])
        x = np.ascontiguousarray(np.concatenate([calib_x] * reps)[:B])
        x_tvm = tvm.runtime.tensor(x)

        runners = [Runner("TVM FP32 (default)", "tvm_fp32", tvm_block(fvm, [x_tvm]))]
        for r in args.ratios:
            name = "FlexiQ INT8 (r=0)" if r == 0 else f"FlexiQ r={r:g}"
            cm.set_ratio(r)
            runners.append(Runner(name, "flexiq", flexiq_block(cm, r, x), ratio=r, mac_ratio=cm.mac_ratio,
                                  channel_ratio=plan.channel_ratio(cm.counts)))
        if not args.no_ort:
            runners.append(Runner("ORT FP32", "ort_fp32", ort_block(ort_fp32, x)))
            runners.append(Runner(ort_name, "ort_int8", ort_block(ort_int8, x)))
        measure(runners, args.rounds, args.min_block_s, args.warmup_s, f"batch {B}")

        base = {r.kind: r for r in runners if r.kind in ("tvm_fp32", "ort_fp32") and r.rounds}
        configs = []
        for r in runners:
            c = {"name": r.name, "kind": r.kind, **r.info, "number": r.number}
            if r.rounds:
                ts = np.asarray(r.rounds)
                med = float(np.median(ts))
                q1, q3 = np.percentile(ts, [25, 75])
                c.update(ms_batch=med * 1e3, ms_sample=med * 1e3 / B, best_ms_batch=float(ts.min()) * 1e3,
                         iqr_pct=float((q3 - q1) / med * 100),
                         rounds_ms=[round(v * 1e3, 5) for v in ts])
                for kind, key in (("tvm_fp32", "speedup_vs_tvm_fp32"), ("ort_fp32", "speedup_vs_ort_fp32")):
                    if kind in base:
                        c[key] = float(np.median(np.asarray(base[kind].rounds) / ts))
            else:
                c["error"] = r.error
            configs.append(c)
        cm.set_ratio(0.0)
        res["batches"].append({"batch_size": B, "compile_s": {"flexiq": round(t_cm, 2), "tvm_fp32": round(t_fvm, 2)},
                               "configs": configs})

        path = os.path.join(workdir, f"flexiq_b{B}.so")
        with quiet_stderr():    # export_library logs one "Scope Saving" warning per function
            cm.export(path)
        sizes["files"][f"FlexiQ artifact .so (B={B})"] = os.path.getsize(path)
        path = os.path.join(workdir, f"tvm_fp32_b{B}.so")
        with quiet_stderr():
            float_executable(model, B).export_library(path)
        sizes["files"][f"TVM FP32 artifact .so (B={B})"] = os.path.getsize(path)

    # ---- ratio switch cost (on the largest-batch artifact; the cost does not depend on it) ----------
    Bsw = max(args.batch_sizes)
    log("ratio switch cost")
    res["switch_cost"] = {"batch_size": Bsw, **switch_costs(builds[Bsw][0], plan, args.ratios)}

    # ---- accuracy: each config on the build with the lowest measured time per sample ---------------
    if test_x is not None and test_y is not None:
        log(f"accuracy on {test_x.shape[0]} test samples")

        def fastest(kind, ratio=None):
            best = None
            for bres in res["batches"]:
                for c in bres["configs"]:
                    if c["kind"] == kind and c.get("ratio") == ratio and c.get("ms_sample") is not None:
                        if best is None or c["ms_sample"] < best[1]:
                            best = (bres["batch_size"], c["ms_sample"])
            return best[0] if best else max(args.batch_sizes)

        acc = {}
        B = fastest("tvm_fp32")
        fvm = builds[B][1]
        acc[("tvm_fp32", None)] = top1(run_chunks(lambda c: fvm["main"](tvm.runtime.tensor(c)).numpy(),
                                                  test_x, B, True), test_y)
        for r in args.ratios:
            cm = builds[fastest("flexiq", r)][0]
            cm.set_ratio(r)
            acc[("flexiq", r)] = top1(cm(test_x), test_y)
            cm.set_ratio(0.0)
        if not args.no_ort:
            for kind, sess in (("ort_fp32", ort_fp32), ("ort_int8", ort_int8)):
                name = sess.get_inputs()[0].name
                fn = lambda c, s=sess, n=name: s.run(None, {n: c})[0]  # noqa: E731
                try:
                    acc[(kind, None)] = top1(run_chunks(fn, test_x, 256, False), test_y)
                except Exception:   # static batch axis
                    Bo = fastest(kind)
                    acc[(kind, None)] = top1(run_chunks(fn, test_x, Bo, True), test_y)
        for bres in res["batches"]:
            for c in bres["configs"]:
                c["top1"] = acc.get((c["kind"], c.get("ratio")))

    # ---- sizes ---------------------------------------------------------------------------------------
    sizes["files"]["ONNX FP32 file"] = os.path.getsize(args.model)
    if qdq_path:
        sizes["files"]["ONNX INT8 QDQ file"] = os.path.getsize(qdq_path)
    sizes["weights"] = weight_bytes(model, plan)
    res["sizes"] = sizes
    res["machine"]["loadavg_end"] = loadavg()
    res["seconds"] = round(time.perf_counter() - T0, 1)

    print(f"{model.name}: {len(model.specs)} FlexiQ layers, group size {plan.group_size}; "
          f"{res['machine']['cpu']}, {res['machine']['cores']} cores, threads TVM "
          f"{res['settings'].get('tvm_runtime_threads')} / ORT {args.threads}; "
          f"load avg {res['machine']['loadavg_start']} -> {res['machine']['loadavg_end']}")
    print(format_tables(res))
    print(f"\ntotal {res['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        log(f"wrote {args.json}")
    if workdir_obj is not None:
        workdir_obj.cleanup()
    return res


if __name__ == "__main__":
    main()
