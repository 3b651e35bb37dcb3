"""Serving under load (issue 14; METHOD section 6): adaptive FlexiQ vs static INT8 vs static all-4-bit.

Three back ends, one set of figures (p50/p90/p99 latency, SLO attainment, the highest Poisson rate
whose p90 meets the SLO, average accuracy served from the per-ratio accuracy of an eval report):

  npu   SIMULATED. A discrete-event simulation (flexiq_tvm.serving.sim) of one NPU behind the
        serving loop. Service time of a batch of b at ratio r = the cycles the NPU artifact's
        simulator counts (`cm.npu_stats()`) for a call at batch size b and ratio r, divided by the
        configured clock; measured at run time from freshly compiled artifacts, never stored here.
  live  LIVE on this machine's CPU against `flexiq serve` (started here, or any KServe v2 URL with
        --url). On a CPU the ratio does not change the speed (every ratio runs the INT8 kernels,
        METHOD section 7): this run shows the controller, the batching and the server overhead,
        not a FlexiQ speedup.
  gpu   From the per-ratio times `benchmarks/gpu_check.sh --json FILE` measured on a GPU, simulated
        like the NPU; reports "not run" when no such file exists (nothing is invented).

    python benchmarks/serving.py all  [--model vit|cnn|PATH.onnx] [--out-dir DIR]      # everything
    python benchmarks/serving.py npu  [--model vit] [--npu-config JSON] [--eval-json E.json]
    python benchmarks/serving.py live [--model cnn] [--slo-ms 50] [--rates 50,100,200] [--url HOST:PORT --name M]
    python benchmarks/serving.py gpu  [--gpu-json gpu.json] [--eval-json E.json]

Every trace is seeded (--seed). Results go to --out-dir (default benchmarks/results/serving/):
serving_<backend>_<model>.json and serving_<backend>_<model>_swing.png (latency over time with the ratio underneath,
as in the paper); plans, eval reports and artifacts are cached in --work-dir (default
$TMPDIR/flexiq_serving). The plan is quantized here with the default evolutionary search unless
--plan is given; for the npu it is quantized without bias recovery when the npu target cannot take
per-ratio bias rows, so that the llvm eval that gives the accuracy column computes what the NPU does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flexiq_tvm.serving import RatioController, poisson_trace, simulate, summarize, swing_trace  # noqa: E402
from flexiq_tvm.serving.sim import swing_rate  # noqa: E402

ASSETS = os.path.join(ROOT, "flexiq_tvm", "assets")
MODELS = {"vit": os.path.join(ASSETS, "fashion_vit.onnx"), "cnn": os.path.join(ASSETS, "fashion_cnn.onnx")}
CALIB = os.path.join(ASSETS, "fashion_calib.npz")
TEST = os.path.join(ASSETS, "fashion_test.npz")
POLICIES = ("int8", "all4", "adaptive")


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- model, plan, accuracy
def model_path(name):
    return MODELS.get(name, name)


def get_plan(args, target):
    """The plan (quantized here unless --plan), with bias recovery only if `target` can take it."""
    import flexiq_tvm as fq
    from flexiq_tvm.targets import get_target

    model = fq.load_model(model_path(args.model))
    if args.plan:
        return model, fq.Plan.load(args.plan)
    recover = bool(getattr(get_target(target), "supports_bias_rows", True))
    os.makedirs(args.work_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(model_path(args.model)))[0]
    cache = os.path.join(args.work_dir, f"{stem}_{args.search}_{'rec' if recover else 'norec'}_s{args.seed}.flexiq")
    if os.path.exists(cache):
        log(f"plan: {cache} (cached; delete it to re-quantize)")
        return model, fq.Plan.load(cache)
    t = time.perf_counter()
    plan = fq.quantize(model, args.calib, search=args.search, recover=recover, seed=args.seed, progress=True)
    plan.save(cache)
    log(f"plan: quantized {stem} ({args.search} search, recover={recover}) in {time.perf_counter() - t:.0f} s -> {cache}")
    return model, plan


def accuracy_per_ratio(args, model, plan, levels, tag):
    """{ratio: top-1 (or agreement with FP32)} from --eval-json, else from an eval of `plan` here."""
    from flexiq_tvm.report.evaluate import evaluate

    path = args.eval_json
    if path is None:
        path = os.path.join(args.work_dir, f"eval_{tag}_{_plan_key(plan)}.json")
        if not os.path.exists(path):
            log(f"accuracy: evaluating the plan on {args.test} at ratios {levels} (llvm; bit-exact with the npu)")
            rep = evaluate(model, plan, args.test, ratios=levels, latency=False, progress=True)
            with open(path, "w") as f:
                json.dump(rep, f, indent=1)
    with open(path) as f:
        rep = json.load(f)
    acc, key = {}, "top1" if rep["ratios"] and rep["ratios"][0].get("top1") is not None else "agree_top1"
    for e in rep["ratios"]:
        acc[float(e["ratio"])] = float(e[key])
        if plan is not None and e.get("counts") is not None and float(e["ratio"]) in levels:
            if list(plan.counts_for_ratio(float(e["ratio"]))) != list(e["counts"]):
                warnings.warn(f"{path}: ratio {e['ratio']} has other per-layer counts than the served plan: "
                              "the accuracy column belongs to another plan")
    missing = [r for r in levels if r not in acc]
    if missing:
        raise SystemExit(f"{path}: the eval report has no entry for ratios {missing} (re-run flexiq eval with --ratios)")
    log(f"accuracy ({key}, {path}): " + ", ".join(f"{r:g}: {100 * acc[r]:.2f}%" for r in levels))
    return acc, key, path


def _plan_key(plan):
    """A short digest of the plan, so a cached eval report is never reused for another plan."""
    import hashlib

    return hashlib.sha256(plan.dumps().encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- simulation driver
def make_controller(levels, slo_s, max_batch, table_fn, batch_sizes, max_wait_s=None):
    """A controller that starts from the same measured table the simulator uses (as warm-up does live)."""
    c = RatioController(levels, slo_s, max_batch=max_batch, max_wait_s=max_wait_s)
    for lv in range(len(levels)):
        for b in batch_sizes:
            if b <= max_batch:
                c.observe(lv, b, table_fn(lv, b))
    return c


def run_policy(policy, arr, service, levels, slo_s, max_batch, max_wait_s, batch_sizes):
    if policy == "adaptive":
        return simulate(arr, service, max_batch, max_wait_s,
                        controller=make_controller(levels, slo_s, max_batch, service, batch_sizes, max_wait_s))
    return simulate(arr, service, max_batch, max_wait_s, static_level=0 if policy == "int8" else len(levels) - 1)


def max_rate(policy, service, levels, slo_s, max_batch, max_wait_s, batch_sizes, lo, hi, n, seed, iters=14):
    """Highest Poisson rate whose p90 latency meets the SLO (bisection on a seeded trace)."""
    def ok(rate):
        res = run_policy(policy, poisson_trace(rate, n, seed), service, levels, slo_s, max_batch, max_wait_s,
                         batch_sizes)
        return np.percentile(res.latency, 90) <= slo_s

    if not ok(lo):
        return 0.0
    while ok(hi):
        lo, hi = hi, hi * 2
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def simulated_study(label, service, levels, batch_sizes, acc, args):
    """Sweep + max rate + swing trace for one simulated back end; returns the JSON section."""
    from tqdm.auto import tqdm

    B = max(b for b in batch_sizes if b <= args.max_batch)
    t_int8_B = service(0, B)
    slo_s = args.slo_ms / 1e3 if args.slo_ms else args.slo_factor * t_int8_B
    max_wait_s = args.max_wait_ms / 1e3 if args.max_wait_ms is not None else slo_s / 10
    cap0 = B / t_int8_B
    log(f"\n== {label}: max batch {B}, SLO {slo_s * 1e3:.4g} ms (p90), max wait {max_wait_s * 1e3:.4g} ms; "
        f"INT8 capacity at full batches {cap0:,.0f} req/s")
    out = {"label": label, "slo_ms": slo_s * 1e3, "max_batch": B, "max_wait_ms": max_wait_s * 1e3,
           "service_ms": {repr(r): {str(b): service(lv, b) * 1e3 for b in batch_sizes} for lv, r in enumerate(levels)},
           "int8_capacity_rps": cap0, "levels": levels, "accuracy": {repr(k): v for k, v in (acc or {}).items()}}
    # sweep
    fracs = [float(f) for f in args.sweep.split(",")]
    sweep = []
    for f in tqdm(fracs, desc=f"{label} sweep", unit="rate"):
        arr = poisson_trace(f * cap0, args.requests, args.seed)
        row = {"rate_rps": f * cap0, "rate_vs_int8_capacity": f}
        for p in POLICIES:
            row[p] = summarize(run_policy(p, arr, service, levels, slo_s, B, max_wait_s, batch_sizes),
                               slo_s, levels, acc)
        sweep.append(row)
    out["poisson_sweep"] = sweep
    log(f"{'rate/cap':>8} {'req/s':>10} | " + " | ".join(f"{p:^26}" for p in POLICIES))
    log(f"{'':>8} {'':>10} | " + " | ".join(f"{'p50':>7} {'p90':>8} {'SLO%':>5} {'acc':>5}" for _ in POLICIES))
    for row in sweep:
        cells = []
        for p in POLICIES:
            s = row[p]
            a = f"{100 * s['accuracy_served']:5.2f}" if "accuracy_served" in s else "  -  "
            cells.append(f"{s['p50_ms']:7.3g} {s['p90_ms']:8.4g} {100 * s['slo_attainment']:5.1f} {a}")
        log(f"{row['rate_vs_int8_capacity']:8.2f} {row['rate_rps']:10,.0f} | " + " | ".join(cells))
    # max rate at the p90 SLO
    mr = {p: max_rate(p, service, levels, slo_s, B, max_wait_s, batch_sizes, 0.05 * cap0, 1.0 * cap0,
                      args.requests, args.seed) for p in tqdm(POLICIES, desc=f"{label} max rate", unit="policy")}
    out["max_rate_at_p90_slo_rps"] = mr
    for p in POLICIES:
        s = summarize(run_policy(p, poisson_trace(mr[p], args.requests, args.seed), service, levels, slo_s, B,
                                 max_wait_s, batch_sizes), slo_s, levels, acc) if mr[p] > 0 else {}
        out.setdefault("at_max_rate", {})[p] = s
    log("highest Poisson rate with p90 <= SLO: " + ", ".join(
        f"{p} {mr[p]:,.0f} req/s ({mr[p] / mr['int8']:.3f}x INT8)" if mr["int8"] else f"{p} {mr[p]:,.0f}"
        for p in POLICIES))
    # swing trace between a low and a high rate
    low = args.swing_low * mr["int8"]
    high = args.swing_high * mr["int8"] if args.swing_high else 0.5 * (mr["int8"] + max(mr["adaptive"], mr["int8"]))
    if mr["adaptive"] <= 1.001 * mr["int8"]:
        log("note: adaptive sustains no higher rate than INT8 here, so no swing can separate them")
    period = args.swing_period_s if args.swing_period_s else 200 * slo_s     # each phase: 100 SLOs long
    duration = 4 * period
    arr = swing_trace(low, high, period, duration, seed=args.seed)
    swing = {"low_rps": low, "high_rps": high, "period_s": period, "duration_s": duration, "requests": int(arr.size)}
    results = {}
    for p in POLICIES:
        res = run_policy(p, arr, service, levels, slo_s, B, max_wait_s, batch_sizes)
        results[p] = res
        swing[p] = summarize(res, slo_s, levels, acc)
    out["swing"] = swing
    log(f"swing trace {low:,.0f} <-> {high:,.0f} req/s, period {period * 1e3:.4g} ms, {arr.size} requests:")
    for p in POLICIES:
        s = swing[p]
        a = f", accuracy served {100 * s['accuracy_served']:.2f}%" if "accuracy_served" in s else ""
        log(f"  {p:>8}: p50 {s['p50_ms']:.4g} ms, p90 {s['p90_ms']:.4g} ms, p99 {s['p99_ms']:.4g} ms, "
            f"SLO attainment {100 * s['slo_attainment']:.1f}%, ratio switches {s['switches']}{a}")
    out["bars"] = bars(mr, swing, slo_s, acc)
    if args.plot:
        path = os.path.join(args.out_dir, f"serving_{args.tag}_swing.png")
        plot_swing(path, label, {p: (r.arrivals, r.latency, np.asarray(levels)[r.level]) for p, r in results.items()},
                   slo_s, lambda t: swing_rate(t, low, high, period), levels)
        out["figure"] = path
        log(f"wrote {path}")
    return out


def bars(mr, swing, slo_s, acc):
    b = {"adaptive_rate_vs_int8": mr["adaptive"] / mr["int8"] if mr["int8"] else None,
         "all4_rate_vs_int8": mr["all4"] / mr["int8"] if mr["int8"] else None}
    b["rate_bar_1.3x_met"] = bool(b["adaptive_rate_vs_int8"] and b["adaptive_rate_vs_int8"] >= 1.3)
    b["swing_adaptive_p90_within_slo"] = swing["adaptive"]["p90_ms"] <= slo_s * 1e3
    b["swing_int8_p90_violates_slo"] = swing["int8"]["p90_ms"] > slo_s * 1e3
    if acc:
        d = 100 * (swing["int8"]["accuracy_served"] - swing["adaptive"]["accuracy_served"])
        b["swing_accuracy_drop_points"] = d
        b["swing_accuracy_within_0.5_points"] = d <= 0.5
    b["all_met"] = all(v for k, v in b.items() if k.endswith("_met") or k.startswith("swing_") and isinstance(v, bool))
    log("bars: " + ", ".join(f"{k}={(round(v, 3) if isinstance(v, float) else v)}" for k, v in b.items()))
    return b


def plot_swing(path, title, runs, slo_s, rate_fn, levels):
    """Latency over time (p50 and p90 per time bin) for each policy, the adaptive ratio underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_end = max(float(a[-1]) for a, _, _ in runs.values())
    bins = np.linspace(0, t_end, 81)
    mid = 0.5 * (bins[1:] + bins[:-1])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    colors = {"int8": "tab:red", "all4": "tab:gray", "adaptive": "tab:blue"}
    names = {"int8": "static INT8", "all4": "static all-4-bit", "adaptive": "FlexiQ adaptive"}
    for p, (arr, lat, _) in runs.items():
        idx = np.digitize(arr, bins) - 1
        p50 = [np.percentile(lat[idx == k], 50) * 1e3 if np.any(idx == k) else np.nan for k in range(len(mid))]
        p90 = [np.percentile(lat[idx == k], 90) * 1e3 if np.any(idx == k) else np.nan for k in range(len(mid))]
        ax.plot(mid, p50, color=colors[p], lw=1.6, label=f"{names[p]} p50")
        ax.plot(mid, p90, color=colors[p], lw=0.9, ls="--", label=f"{names[p]} p90")
    ax.axhline(slo_s * 1e3, color="k", lw=0.8, ls=":", label="SLO")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    arr, _, ratio = runs["adaptive"]
    idx = np.digitize(arr, bins) - 1
    mean_ratio = [np.mean(ratio[idx == k]) if np.any(idx == k) else np.nan for k in range(len(mid))]
    ax2.step(mid, mean_ratio, where="mid", color="tab:blue", label="adaptive ratio (mean per bin)")
    ax2.set_ylim(-0.05, max(levels) + 0.05)
    ax2.set_ylabel("4-bit ratio")
    ax2.set_xlabel("time (s)")
    ax3 = ax2.twinx()
    ax3.plot(mid, rate_fn(mid), color="tab:orange", lw=0.8, alpha=0.7)
    ax3.set_ylabel("offered req/s", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- NPU (simulated)
def npu_service_table(model, plan, levels, batch_sizes, npu_config, x):
    """{(level, b): seconds}: cycles counted by the NPU artifact compiled at batch b, at its clock."""
    import flexiq_tvm as fq
    from tqdm.auto import tqdm

    table, info = {}, {}
    for b in tqdm(batch_sizes, desc="npu artifacts", unit="batch size"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = fq.compile(model, plan, target="npu", batch_size=b, npu_config=npu_config)
        for lv, r in enumerate(levels):
            cm.set_ratio(r)
            cm(x[:b])
            st = cm.npu_stats()
            table[(lv, b)] = st["total_cycles"] / (st["config"]["clock_mhz"] * 1e6)
            info[f"{r!r}@{b}"] = {"cycles": st["total_cycles"], "mac_ratio": round(cm.mac_ratio, 4),
                                  "layers_on_npu": len(st["layers"])}
        info["config"] = st["config"]
    return table, info


def table_service(table, batch_sizes):
    """service(level, b): the artifact of the smallest compiled batch >= b (a short batch is padded,
    as `CompiledModel.__call__` does); beyond the largest, whole batches of the largest."""
    sizes = sorted(batch_sizes)

    def service(lv, b):
        for s in sizes:
            if s >= b:
                return table[(lv, s)]
        return table[(lv, sizes[-1])] * math.ceil(b / sizes[-1])
    return service


def cmd_npu(args):
    from flexiq_tvm.calibrate.data import load_data

    model, plan = get_plan(args, "npu")
    levels = sorted(set([0.0] + [float(r) for r in plan.levels]))
    acc, key, _ = accuracy_per_ratio(args, model, plan, levels, f"npu_{os.path.basename(args.model)}")
    x, _ = load_data(args.calib, model)
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    cfg = json.loads(args.npu_config) if args.npu_config else None
    table, info = npu_service_table(model, plan, levels, batch_sizes, cfg, x)
    log("NPU service time per batch (us, from the artifact's cycle counts at its clock):")
    log(f"{'ratio':>6} " + " ".join(f"{'B=' + str(b):>9}" for b in batch_sizes) + "   speedup vs INT8 at max B")
    for lv, r in enumerate(levels):
        log(f"{r:>6g} " + " ".join(f"{table[(lv, b)] * 1e6:9.2f}" for b in batch_sizes) +
            f"   {table[(0, batch_sizes[-1])] / table[(lv, batch_sizes[-1])]:.3f}x")
    service = table_service(table, batch_sizes)
    out = simulated_study("NPU simulated (" + os.path.basename(model_path(args.model)) + ")", service, levels,
                          batch_sizes, acc, args)
    out.update({"backend": "npu", "simulated": True, "accuracy_metric": key, "npu": info,
                "note": "SIMULATED: discrete-event queue; service times are the NPU simulator's cycle counts"})
    return out


# --------------------------------------------------------------------------- GPU (from gpu_check)
def cmd_gpu(args):
    path = args.gpu_json
    if not path or not os.path.exists(path):
        msg = (f"GPU: not run. No gpu_check output at {path!r}; run `bash benchmarks/gpu_check.sh --json FILE` on a "
               "GPU machine and pass --gpu-json FILE. No GPU numbers are reported without it.")
        log("\n== " + msg)
        return {"backend": "gpu", "run": False, "note": msg}
    with open(path) as f:
        rep = json.load(f)
    outs = {"backend": "gpu", "run": True, "source": path, "env": rep.get("env"), "arch": rep.get("arch"), "models": {}}
    acc = None
    if args.eval_json:
        acc, _, _ = accuracy_per_ratio(args, None, None, [], "gpu")
    for name, entry in rep.get("models", {}).items():
        timing = entry.get("timing") or {}
        if not timing:
            log(f"GPU {name}: no timings in {path} (dry run?)")
            continue
        batch_sizes = sorted(int(b) for b in timing)
        levels = sorted({float(r) for b in timing for r in timing[b]["ratios"]})
        table = {(lv, b): timing[str(b)]["ratios"][k]["ms"] / 1e3 for b in batch_sizes for lv, r in enumerate(levels)
                 for k in timing[str(b)]["ratios"] if float(k) == r}
        a = {r: acc[r] for r in levels} if acc and all(r in acc for r in levels) else None
        old = args.max_batch
        args.max_batch = max(batch_sizes) if args.max_batch < min(batch_sizes) else args.max_batch
        args.tag = f"gpu_{name}"
        outs["models"][name] = simulated_study(f"GPU measured+simulated ({name}, {rep.get('env', {}).get('device')})",
                                               table_service(table, batch_sizes), levels, batch_sizes, a, args)
        args.max_batch = old
    args.tag = "gpu"
    return outs


# --------------------------------------------------------------------------- live CPU
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url, method, path, body=None):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url if "//" in url else "http://" + url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def start_server(args, model, plan):
    """Compile for llvm at --max-batch, export, start `flexiq serve` in a subprocess; (proc, url, name, .so)."""
    import flexiq_tvm as fq

    so = os.path.join(args.work_dir, f"serve_{os.path.splitext(os.path.basename(model_path(args.model)))[0]}.so")
    cm = fq.compile(model, plan, target="llvm", batch_size=args.max_batch)
    cm.export(so)
    port = _free_port()
    cmd = [sys.executable, "-m", "flexiq_tvm", "serve", so, "--slo-ms", str(args.slo_ms), "--port", str(port),
           "--max-batch", str(args.max_batch)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))   # this tree's flexiq_tvm
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"flexiq serve exited: {proc.stdout.read()}")
        try:
            if _http(url, "GET", "/v2/health/ready")[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise SystemExit("flexiq serve did not come up within 120 s")
    log(f"started: {' '.join(cmd)}")
    return proc, url, os.path.splitext(os.path.basename(so))[0], so


def _metrics(url):
    st, body = _http(url, "GET", "/metrics")
    vals = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            vals[k] = float(v)
    return vals


def cmd_live(args):
    from flexiq_tvm.calibrate.data import load_data
    from flexiq_tvm.serving.loadgen import run_open_loop, summarize_live

    proc = None
    if args.url:
        url, name = args.url, args.name
        if not name:
            raise SystemExit("--url needs --name (the model name in the server's URLs)")
        model = plan = None
        x = np.load(args.test)["inputs"][:256].astype(np.float32)
        levels = None
    else:
        model, plan = get_plan(args, "llvm")
        levels = sorted(set([0.0] + [float(r) for r in plan.levels]))
        proc, url, name, _ = start_server(args, model, plan)
        x, _ = load_data(args.test, model)
        x = x[:256]
    acc = None
    if plan is not None or args.eval_json:
        acc, _, _ = accuracy_per_ratio(args, model, plan, levels or [], f"llvm_{os.path.basename(args.model)}")
    slo_s = args.slo_ms / 1e3
    rates = [float(r) for r in args.rates.split(",")]
    pins = {"adaptive": None, "int8": 0.0, "all4": 1.0}
    can_pin = _http(url, "GET", "/admin/ratio")[0] == 200
    out = {"backend": "live", "simulated": False, "url": url, "slo_ms": args.slo_ms, "max_batch": args.max_batch,
           "machine": f"{os.cpu_count()} CPU cores ({_cpu_name()}); load generator on the same machine",
           "note": "LIVE on the CPU: the ratio does not change CPU speed (every ratio runs the INT8 kernels); this "
                   "run measures the controller, dynamic batching and server overhead, not a FlexiQ speedup",
           "poisson_sweep": [], "switch_overhead_us": {}}
    log(f"\n== live: {url} model {name}, SLO {args.slo_ms} ms. {out['note']}")
    try:
        for rate in rates:                          # policies interleaved per rate: a shared machine drifts
            for p in (POLICIES if can_pin else ("adaptive",)):
                if can_pin:
                    _http(url, "POST", "/admin/ratio", json.dumps({"ratio": pins[p]}).encode())
                arr = poisson_trace(rate, max(int(rate * args.live_seconds), 20), args.seed)
                m0 = _metrics(url)
                s = summarize_live(run_open_loop(url, name, arr, x, progress=not args.quiet), slo_s, acc)
                m1 = _metrics(url)
                nb = sum(v - m0.get(k, 0) for k, v in m1.items() if k.startswith("flexiq_batches_total"))
                key = 'flexiq_switch_overhead_seconds{stat="sum"}'
                s["batches"] = nb
                s["switch_overhead_us_mean"] = (m1.get(key, math.nan) - m0.get(key, 0)) / max(nb, 1) * 1e6
                s["switch_overhead_us_max"] = m1.get('flexiq_switch_overhead_seconds{stat="max"}', math.nan) * 1e6
                s["ratio_switches"] = m1.get("flexiq_ratio_switches_total", 0) - m0.get("flexiq_ratio_switches_total", 0)
                out["poisson_sweep"].append({"policy": p, "rate_rps": rate, **s})
                a = f" acc {100 * s['accuracy_served']:.2f}%" if "accuracy_served" in s else ""
                log(f"  {p:>8} {rate:7.0f} req/s: p50 {s.get('p50_ms', float('nan')):7.2f} ms  p90 "
                    f"{s.get('p90_ms', float('nan')):7.2f} ms  p99 {s.get('p99_ms', float('nan')):7.2f} ms  "
                    f"SLO {100 * s['slo_attainment']:5.1f}%  failed {s['failed']}{a}  switch overhead "
                    f"{s['switch_overhead_us_mean']:.1f} us/batch over {nb:.0f} batches (max since start "
                    f"{s['switch_overhead_us_max']:.1f})")
        mr = {}
        for row in out["poisson_sweep"]:
            if row.get("p90_ms", math.inf) <= args.slo_ms and row["failed"] == 0:
                mr[row["policy"]] = max(mr.get(row["policy"], 0.0), row["rate_rps"])
        out["max_rate_at_p90_slo_rps"] = mr
        log("highest tested rate with p90 <= SLO: " + ", ".join(f"{p} {v:g} req/s" for p, v in mr.items()))
        # swing
        low, high = [float(v) for v in args.live_swing.split(",")]
        arr = swing_trace(low, high, args.live_swing_period_s, 2 * args.live_swing_period_s, seed=args.seed)
        swing, runs = {"low_rps": low, "high_rps": high, "period_s": args.live_swing_period_s}, {}
        for p in (POLICIES if can_pin else ("adaptive",)):
            if can_pin:
                _http(url, "POST", "/admin/ratio", json.dumps({"ratio": pins[p]}).encode())
            res = run_open_loop(url, name, arr, x, progress=not args.quiet)
            swing[p] = summarize_live(res, slo_s, acc)
            ok = res["status"] == 200
            runs[p] = (res["arrivals"][ok], res["latency"][ok], res["ratio"][ok])
            s = swing[p]
            log(f"  swing {p:>8}: p50 {s.get('p50_ms', float('nan')):.2f} ms p90 {s.get('p90_ms', float('nan')):.2f} ms "
                f"SLO {100 * s['slo_attainment']:.1f}% failed {s['failed']}")
        out["swing"] = swing
        if args.plot and "adaptive" in runs:
            path = os.path.join(args.out_dir, f"serving_{args.tag}_swing.png")
            plot_swing(path, "LIVE CPU (ratio does not change CPU speed)", runs, slo_s,
                       lambda t: swing_rate(t, low, high, args.live_swing_period_s), levels or [0.0, 1.0])
            out["figure"] = path
            log(f"wrote {path}")
        if can_pin:
            _http(url, "POST", "/admin/ratio", b'{"ratio": null}')
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return out


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backend", choices=["all", "npu", "live", "gpu"])
    ap.add_argument("--model", default=None, help="vit, cnn or an ONNX path (default: npu vit, live cnn)")
    ap.add_argument("--calib", default=CALIB)
    ap.add_argument("--test", default=TEST)
    ap.add_argument("--plan", default=None, help="use this plan instead of quantizing")
    ap.add_argument("--search", default="evolutionary", help="quantize search when no --plan (default evolutionary)")
    ap.add_argument("--eval-json", default=None, help="per-ratio accuracy from `flexiq eval --json` (default: "
                    "evaluate the plan here)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results", "serving"),
                    help="results: serving_<backend>.json and the swing-trace PNGs")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "flexiq_serving"),
                    help="plans, eval reports and artifacts (cached between runs; delete to redo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=None, help="simulated batching wait (default SLO/10)")
    ap.add_argument("--slo-ms", type=float, default=None, help="p90 SLO (simulated default: --slo-factor x the INT8 "
                    "full-batch time; live default 50)")
    ap.add_argument("--slo-factor", type=float, default=5.0)
    # simulation
    ap.add_argument("--batch-sizes", default="1,2,4,8", help="NPU artifacts compiled per batch size")
    ap.add_argument("--npu-config", default=None)
    ap.add_argument("--requests", type=int, default=20000, help="requests per simulated Poisson run")
    ap.add_argument("--sweep", default="0.5,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4",
                    help="Poisson rates as multiples of the INT8 full-batch capacity")
    ap.add_argument("--swing-low", type=float, default=0.5, help="swing low rate, x INT8's max rate at the SLO")
    ap.add_argument("--swing-high", type=float, default=None,
                    help="swing high rate, x INT8's max rate (default: midway to adaptive's max rate)")
    ap.add_argument("--swing-period-s", type=float, default=None, help="default: 200 x the SLO (4 periods)")
    # live
    ap.add_argument("--url", default=None, help="live: an already running KServe v2 server (HOST:PORT)")
    ap.add_argument("--name", default=None, help="live: model name at --url")
    ap.add_argument("--rates", default="25,50,100,200", help="live Poisson rates (req/s)")
    ap.add_argument("--live-seconds", type=float, default=4.0)
    ap.add_argument("--live-swing", default="25,150", help="live swing low,high (req/s)")
    ap.add_argument("--live-swing-period-s", type=float, default=6.0)
    ap.add_argument("--gpu-json", default=os.environ.get("FLEXIQ_GPU_CHECK_JSON",
                                                         os.path.join(ROOT, "benchmarks", "results", "gpu_check.json")))
    ap.add_argument("--tag-suffix", default=None, help="appended to the result file names (e.g. dma128)")
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    todo = ["npu", "live", "gpu"] if args.backend == "all" else [args.backend]
    model_arg, slo_arg = args.model, args.slo_ms
    for backend in todo:
        args.model = model_arg or ("cnn" if backend == "live" else "vit")
        args.slo_ms = slo_arg if slo_arg is not None else (50.0 if backend == "live" else None)
        args.tag = backend if backend == "gpu" else \
            f"{backend}_{os.path.splitext(os.path.basename(model_path(args.model)))[0]}"
        args.tag += "_" + args.tag_suffix if args.tag_suffix else ""
        t = time.perf_counter()
        res = {"npu": cmd_npu, "live": cmd_live, "gpu": cmd_gpu}[backend](args)
        res["seconds"] = round(time.perf_counter() - t, 1)
        res["command"] = " ".join([os.path.basename(sys.executable), "benchmarks/serving.py"] + (argv or sys.argv[1:]))
        path = os.path.join(args.out_dir, f"serving_{args.tag}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=float)
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
