"""Which 1x1 convs should run on Intel AMX: whole-model builds A/B, in one process.

    python3 benchmarks/llvm_amx.py [--model mobilenetv2|vit] [--batch-size 32] [--rounds 7]

Builds, interleaved (median of per-round ratios to the VNNI build; per-kernel medians through the
VM's `set_instrument`, one call per round):
  vnni       the target without AMX (every 1x1 conv on AVX-512 VNNI)
  amx        the default on an AMX host (passes/pack_conv_input.py: the 1x1 convs whose plane is
             not a multiple of 16 positions)
  amx-all    AMX for every 1x1 conv with at least 24 input channels (the rule measured and dropped)
All builds are checked bit-exact against the VNNI build at ratio 0.5. Needs a CPU with AMX.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))


def _amx_every_plane(kf):
    """The dropped rule: any pointwise conv of >= 24 input channels over >= 16 positions."""
    from flexiq_tvm.passes import pack_conv_input as pci
    from flexiq_tvm.schedules.x86_amx import amx_blocking

    C = int(kf.attrs["flexiq.in_channels"])
    ys = pci.param_shape(kf, len(kf.params) - 1)
    return pci._pointwise(kf) and ys[2] * ys[3] >= 16 and C >= 24 and amx_blocking(ys[1], (C + 3) // 4) is not None


def model_and_cached_plan(name: str, work_dir: str):
    """The benchmark model (gpu_check.py's builder) and the plan `benchmarks/llvm_deploy.py` makes
    and caches for it; the A/B scripts of the llvm rewrites compare builds of that one plan."""
    import gpu_check as g
    from flexiq_tvm.quant.plan import Plan

    os.makedirs(work_dir, exist_ok=True)
    _, model, _, _ = g.BUILDERS[name](work_dir)
    plan_path = os.path.join(HERE, "gpu_results", "plans", f"{name}.plan.json")
    if not os.path.exists(plan_path):
        sys.exit(f"{plan_path} missing: run benchmarks/llvm_deploy.py --model {name} once (it makes it)")
    return model, Plan.load(plan_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mobilenetv2", "vit"], default="mobilenetv2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work-dir", default="/tmp/flexiq_llvm_deploy")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")

    import tvm
    from tvm.runtime.vm import VMInstrumentReturnKind

    import flexiq_tvm as fq
    from flexiq_tvm.passes import pack_conv_input as pci
    from flexiq_tvm.schedules.x86_amx import amx_usable, with_amx

    if not amx_usable():
        sys.exit("this CPU (or this process) cannot use AMX")
    model, plan = model_and_cached_plan(args.model, args.work_dir)
    B = args.batch_size
    base = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
    default_rule = pci._amx_ok
    cms = {"vnni": fq.compile(model, plan, batch_size=B, tvm_target=base),
           "amx": fq.compile(model, plan, batch_size=B, tvm_target=with_amx(base))}
    try:
        pci._amx_ok = _amx_every_plane
        cms["amx-all"] = fq.compile(model, plan, batch_size=B, tvm_target=with_amx(base))
    finally:
        pci._amx_ok = default_rule
    x = np.random.default_rng(0).standard_normal((B,) + tuple(model.input_shape)).astype(np.float32)
    ref = None
    for k, cm in cms.items():
        cm.set_ratio(0.5)
        y = cm(x)
        ref = y if ref is None else ref
        print(f"{k}: bit-exact with the VNNI build at ratio 0.5: {np.array_equal(ref, y)}")

    total = {k: [] for k in cms}
    per_kernel = {k: collections.defaultdict(list) for k in cms}
    for _ in range(args.rounds):
        for k, cm in cms.items():
            cm.set_ratio(0.0)
            total[k].append(cm.time_batch(number=2, repeat=1))
            start, acc = [0.0], collections.defaultdict(float)

            def instr(func, name, before, ret, *a, start=start, acc=acc):
                if before:
                    start[0] = time.perf_counter()
                else:
                    acc[name] += time.perf_counter() - start[0]
                return VMInstrumentReturnKind.NO_OP

            cm.vm.set_instrument(instr)
            cm(x)
            cm.vm.set_instrument(lambda *a: VMInstrumentReturnKind.NO_OP)
            for name, v in acc.items():
                per_kernel[k][name].append(v)
    print(f"\n{args.model}, batch {B}, ratio 0, one thread, {args.rounds} rounds")
    for k in cms:
        print(f"  {k:8s} median {np.median(total[k]) * 1e3:9.2f} ms   / vnni {np.median(np.array(total[k]) / np.array(total['vnni'])):.3f}")
    print("\nslowest kernels of the VNNI build (ms; AMX kernels matched by name):  vnni  amx  amx-all")
    for name in sorted(per_kernel["vnni"], key=lambda n: -np.median(per_kernel["vnni"][n]))[:25]:
        row = []
        for k in cms:
            m = [v for n, v in per_kernel[k].items() if n.replace("_amx", "_packed") == name]
            row.append(f"{np.median(m[0]) * 1e3:7.2f}" if m else "      -")
        print(" ".join(row), name)


if __name__ == "__main__":
    main()
