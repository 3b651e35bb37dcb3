"""A/B of whole llvm builds: depthwise convs writing the next 1x1 conv's packed words
(`passes/fuse_requant.py`, issue 12) never, by the default rule (float maps of at least
`PACKED_MIN_MAP_BYTES`) and always, in one process.

    python3 benchmarks/llvm_packed_requant.py [--model mobilenetv2|vit] [--batch-sizes 1 32] [--rounds 7]

One thread (`TVM_NUM_THREADS=1` unless set), ratio 0.5, builds timed in interleaved rounds; the
speedups are medians of the paired per-round ratios against the "never" build. Every build is
checked bit-exact against "never" at ratios 0, 0.5 and 1. Uses the plan `benchmarks/llvm_deploy.py`
makes and caches (run it once first).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mobilenetv2", "vit"], default="mobilenetv2")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work-dir", default="/tmp/flexiq_llvm_deploy")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")

    import flexiq_tvm as fq
    from flexiq_tvm.passes import fuse_requant
    from llvm_amx import model_and_cached_plan

    model, plan = model_and_cached_plan(args.model, args.work_dir)
    default = fuse_requant.PACKED_MIN_MAP_BYTES
    rules = {"never": float("inf"), "default": default, "always": 0}
    for B in args.batch_sizes:
        cms = {}
        try:
            for name, threshold in rules.items():
                fuse_requant.PACKED_MIN_MAP_BYTES = threshold
                cms[name] = fq.compile(model, plan, batch_size=B)
        finally:
            fuse_requant.PACKED_MIN_MAP_BYTES = default
        x = np.random.default_rng(0).standard_normal((B,) + tuple(model.input_shape)).astype(np.float32)
        for r in (0.0, 0.5, 1.0):
            ys = []
            for cm in cms.values():
                cm.set_ratio(r)
                ys.append(cm(x))
            assert all(np.array_equal(ys[0], y) for y in ys[1:]), f"builds differ at ratio {r}"
        times = {k: [] for k in cms}
        names = list(cms)
        for rnd in range(args.rounds):
            for k in names[rnd % len(names):] + names[:rnd % len(names)]:
                cms[k].set_ratio(0.5)
                times[k].append(cms[k].time_batch(number=2, repeat=1))
        never = np.array(times["never"])
        print(f"{args.model}, batch {B}, ratio 0.5, {args.rounds} rounds (bit-exact at 0 / 0.5 / 1)")
        for k, ts in times.items():
            ts = np.array(ts)
            print(f"  {k:8s} median {np.median(ts) * 1e3:9.2f} ms   / never {np.median(ts / never):.3f}", flush=True)


if __name__ == "__main__":
    main()
