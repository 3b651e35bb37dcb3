"""A/B of the llvm kernel definitions between a git revision's `schedules/compute.py` and the
working tree's, on MobileNetV2's requantizing 1x1 convs (batch 32 shapes scaled by --batch) and
their quantize kernels, with the working tree's schedules for both.

    python3 benchmarks/kernel_ab.py [--rev HEAD~1] [--batch 8] [--rounds 15]

Both kernels of a pair are built in one process, checked bit-exact on the same inputs (codes at a
ratio with low channels), then called alternately; the ratio is the median of paired new/old times.
Run with TVM_NUM_THREADS=1 for the steadiest numbers on a shared machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

# (name, C, H, W, O): the expansions of MobileNetV2 (the planes a multiple of 16 positions: spatial
# lanes on VNNI), each writing its depthwise reader's padded codes after ReLU6
SHAPES = [("16->96 @112", 16, 112, 112, 96), ("24->144 @56", 24, 56, 56, 144),
          ("32->192 @28", 32, 28, 28, 192), ("64->384 @16", 64, 16, 16, 384)]


def _compute_at(rev: str):
    """`flexiq_tvm/schedules/compute.py` as it was at `rev`, imported as a module of its own."""
    text = subprocess.run(["git", "show", f"{rev}:flexiq_tvm/schedules/compute.py"], cwd=HERE, check=True,
                          capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="flexiq_kernel_ab_") as tmp:
        path = os.path.join(tmp, "compute_at_rev.py")
        with open(path, "w") as f:
            f.write(text)
        spec = importlib.util.spec_from_file_location("compute_at_rev", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def _args(fc, func, rng):
    out = []
    for i, p in enumerate(func.params):
        shape, name = fc.param_shape(func, i), str(p.name)
        if name == "scale":
            a = np.full(shape, 1e-3, np.float32)
        elif name == "bias":
            a = rng.normal(size=shape).astype(np.float32)
        elif name == "x":
            a = rng.uniform(-1, 7, size=shape).astype(np.float32)
        elif name == "qx":
            a = rng.integers(0, 256, size=shape).astype(np.uint8)
        elif name == "w_l":
            a = rng.integers(-127, 128, size=shape).astype(np.int8)
        elif name == "counts":
            a = np.full(shape, 2, np.int32)               # half of 4 groups low
        elif name == "rank":
            a = (rng.permutation(shape[0]) % 4).astype(np.int32)
        elif name == "shift":
            a = rng.integers(0, 5, size=shape).astype(np.int32)
        else:   # the output
            a = np.zeros(shape, np.uint8)
        out.append(a)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD~1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)

    import tvm

    from flexiq_tvm.schedules import compute as new
    from flexiq_tvm.schedules import llvm as fl

    old = _compute_at(args.rev)
    target = fl.default_target()
    N = args.batch
    rng = np.random.default_rng(0)

    def conv(mod, C, H, W, O):
        return mod.conv2d_int8((N, C, H, W), (O, C, 1, 1), unsigned=True, layout="OIHWo4i", ob=16, packed_input=True,
                               spatial_lanes=True, act=(0.0, 6.0),
                               requant=dict(scale=0.03, unsigned=True, pad=1, layer_index=0, num_layers=1))

    def quantize(mod, C, H, W, O):
        return mod.quantize_act((N, O, H, W), 1, 1, 0.03, True, 0, 1)

    print(f"compute.py at {args.rev} (old) vs the working tree (new), batch {N}, "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'all')}")
    for name, C, H, W, O in SHAPES:
        for kind in (conv, quantize):
            fo, fn = kind(old, C, H, W, O), kind(new, C, H, W, O)
            mo, mn = (fl.build(f, name="k", target=target)["k"] for f in (fo, fn))
            data = [tvm.runtime.tensor(a) for a in _args(new, fn, rng)]
            outs = []
            for m in (mo, mn):
                m(*data)
                outs.append(data[-1].numpy().copy())
            exact = bool(np.array_equal(*outs))
            to, tn = [], []
            for _ in range(args.rounds):
                for m, ts in ((mo, to), (mn, tn)):
                    t0 = time.perf_counter()
                    m(*data)
                    ts.append(time.perf_counter() - t0)
            to, tn = np.array(to), np.array(tn)
            print(f"  {name:12s} {kind.__name__:8s} old {np.median(to) * 1e3:7.2f} ms  new {np.median(tn) * 1e3:7.2f} ms"
                  f"  new/old {np.median(tn / to):.3f}  bit-exact {exact}", flush=True)
            if not exact:
                sys.exit(f"{name} {kind.__name__}: the two revisions' kernels disagree")


if __name__ == "__main__":
    main()
