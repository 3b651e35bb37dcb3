"""The one place that runs the float model to gather statistics for quantization.

The FP32 model is compiled by TVM with every quantizable layer's input tapped as an extra output;
calibration batches stream through it and each layer gets a `TensorStats`: exact per-channel
ranges and second moments, plus a seeded subsample of values for the percentile and MSE calibrators,
and, when asked, the Gram matrix of the layer's input patches that error-compensating rounding needs.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import tvm
from tvm import relax
from tqdm.auto import tqdm

from ..errors import DataError
from ..frontend.model import FloatModel
from ..passes.tap_outputs import TapOutputs
from ..quant.calibrators import TensorStats
from ..quant.rounding import input_gram

SAMPLE_PER_BATCH = 4096
SAMPLE_CAP = 1 << 20
CHANNEL_POSITIONS_PER_BATCH = 128
CHANNEL_SAMPLE_CAP = 2048


def default_target():
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                              "num-cores": 2})


def build_float(mod: tvm.IRModule, target=None):
    """Compile a float Relax module for the CPU with TVM's default (fusing) pipeline."""
    target = target or default_target()
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    return relax.VirtualMachine(ex, tvm.cpu())


class _Accumulator:
    def __init__(self, channel_axis_from_end: Optional[int], channels: int, rng):
        self.axis = channel_axis_from_end
        self.absmax = np.zeros(channels)
        self.sqsum = np.zeros(channels)
        self.n = 0
        self.minimum, self.maximum = np.inf, -np.inf
        self.samples: List[np.ndarray] = []
        self.kept = 0
        self.channel_samples: List[np.ndarray] = []
        self.channel_kept = 0
        self.rng = rng
        self.gram = None

    def add_gram(self, a: np.ndarray, spec):
        g = input_gram(a, spec)
        self.gram = g if self.gram is None else self.gram + g

    def add(self, a: np.ndarray, channel_axis: int):
        red = tuple(i for i in range(a.ndim) if i != channel_axis)
        self.absmax = np.maximum(self.absmax, np.abs(a).max(axis=red))
        self.sqsum += (a.astype(np.float64) ** 2).sum(axis=red)
        self.n += a.size // a.shape[channel_axis]
        self.minimum = min(self.minimum, float(a.min()))
        self.maximum = max(self.maximum, float(a.max()))
        if self.kept < SAMPLE_CAP:
            flat = a.reshape(-1)
            take = min(SAMPLE_PER_BATCH, flat.size)
            pick = self.rng.choice(flat.size, size=take, replace=False) if take < flat.size else slice(None)
            self.samples.append(flat[pick].astype(np.float32))
            self.kept += take
        if self.channel_kept < CHANNEL_SAMPLE_CAP:
            by_channel = np.moveaxis(a, channel_axis, 0).reshape(a.shape[channel_axis], -1)
            take = min(CHANNEL_POSITIONS_PER_BATCH, by_channel.shape[1], CHANNEL_SAMPLE_CAP - self.channel_kept)
            cols = self.rng.choice(by_channel.shape[1], size=take, replace=False)
            self.channel_samples.append(by_channel[:, np.sort(cols)].astype(np.float32))
            self.channel_kept += take

    def stats(self, count: int) -> TensorStats:
        return TensorStats(channel_absmax=self.absmax.astype(np.float32),
                           channel_sqmean=self.sqsum / max(self.n, 1), minimum=float(self.minimum),
                           maximum=float(self.maximum),
                           sample=np.concatenate(self.samples) if self.samples else np.zeros(0, np.float32),
                           count=count,
                           channel_sample=np.concatenate(self.channel_samples, axis=1) if self.channel_samples else None,
                           gram=self.gram)


def collect_stats(model: FloatModel, data: np.ndarray, batch_size: int = 32, seed: int = 0,
                  progress: bool = True, target=None, grams: bool = False) -> List[TensorStats]:
    """Per-layer input statistics of `model` over the calibration inputs `data` (N, ...); with
    `grams`, each layer's input-patch Gram matrix too (for `rounding="compensated"`)."""
    data = model.check_inputs(data, what="calibration data")
    if not model.layers:
        return []
    from ..frontend.graph import bindings

    # a graph that pins its batch (or folds only at a known one) runs padded chunks of that batch
    batch_size = model.batch_for(batch_size)
    mod, layers = model.at(batch_size)
    main = mod["main"]
    static = isinstance(main.params[0].ty.shape.values[0], tvm.tirx.IntImm)   # runs exactly batch_size
    taps = []
    for layer in layers:
        call = next(b.value for b in bindings(main) if b.var.same_as(layer.var))
        taps.append(call.args[0])
    vm = build_float(TapOutputs(taps)(mod), target)
    rng = np.random.default_rng(seed)
    accs = [_Accumulator(None, l.spec.in_channels, rng) for l in model.layers]
    starts = range(0, data.shape[0], batch_size)
    for s in tqdm(starts, desc="calibrate", unit="batch", disable=not progress):
        chunk = data[s:s + batch_size]
        n = chunk.shape[0]
        if static and n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        outs = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(chunk)))
        for i, (layer, acc) in enumerate(zip(model.layers, accs)):
            a = outs[i + 1].numpy()[:n]
            if not np.all(np.isfinite(a)):
                raise DataError(f"calibration: the float model produced NaN/inf at the input of {layer.spec.name}")
            acc.add(a, 1 if layer.spec.op == "conv2d" else a.ndim - 1)
            if grams:
                acc.add_gram(a, layer.spec)
    return [a.stats(data.shape[0]) for a in accs]
