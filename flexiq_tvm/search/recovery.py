"""Accuracy recovery after the search (METHOD section 5): per-ratio bias correction.

Lowering channels to 4-bit shifts the mean of each layer's output. For every ratio level, layer by
layer in program order (so each layer sees the already-corrected layers before it), the mean
output error per output channel against the INT8 model (ratio 0) is measured on calibration data
and removed through the bias. The corrections are stored per level in the plan; the compiled
artifact holds one bias row per level and `set_ratio` selects it, at no extra cost per call.
"""
from __future__ import annotations

import time

import numpy as np
import tvm
from tqdm.auto import tqdm

from ..quant.plan import Plan


def recover_bias(model, plan: Plan, inputs: np.ndarray, samples: int = 256, batch_size: int = 64, seed: int = 0,
                 progress: bool = True, target: str = "llvm") -> Plan:
    """Fills `plan.bias_correction` for every level above 0 (in place) and returns the plan."""
    from ..runtime.build import compile_with_taps

    t0 = time.perf_counter()
    plan.bias_correction = {}
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(inputs.shape[0], size=min(samples, inputs.shape[0]), replace=False))
    x = inputs[pick]
    if getattr(model, "fixed_batch", None):
        # a graph that pins its batch: whole chunks of it, filled by repeating the picked samples
        # (means are taken over a chunk inside the graph, so padding with zeros would bias them)
        batch = model.fixed_batch
        x = x[np.arange(-(-x.shape[0] // batch) * batch) % x.shape[0]]
    else:
        batch = max(1, min(batch_size, x.shape[0]))
        x = x[: x.shape[0] - x.shape[0] % batch]
    chunks = [tvm.runtime.tensor(np.ascontiguousarray(x[s:s + batch])) for s in range(0, x.shape[0], batch)]
    vm = compile_with_taps(model, plan, batch_size=batch, target=target, runtime_bias=True, channel_means=True)
    specs = model.specs
    L = plan.num_layers

    def means(counts, biases):
        c = tvm.runtime.tensor(np.asarray(counts, np.int32))
        b = [tvm.runtime.tensor(v.astype(np.float32)) for v in biases]
        acc = None
        for ch in chunks:
            outs = vm["main"](ch, c, *b)
            m = [outs[1 + i].numpy().astype(np.float64) for i in range(L)]
            acc = m if acc is None else [a + v for a, v in zip(acc, m)]
        return [a / len(chunks) for a in acc]

    original = [s.bias.astype(np.float64) for s in specs]
    reference = means(np.zeros(L, np.int32), original)
    levels = [r for r in sorted(plan.levels) if r > 0]
    bar = tqdm(total=len(levels) * L, desc="bias correction", disable=not progress, leave=False)
    for r in levels:
        counts = plan.counts_for_prefix(plan.levels[r])
        first = int(np.argmax(counts > 0)) if counts.any() else L
        biases = [b.copy() for b in original]
        deltas = [np.zeros(s.out_channels) for s in specs]
        for l in range(L):
            bar.update(1)
            if l < first:
                continue                      # identical to INT8 before the first lowered layer
            delta = means(counts, biases)[l] - reference[l]
            deltas[l] += delta
            biases[l] = biases[l] - delta
        plan.bias_correction[float(r)] = [d.astype(np.float32) for d in deltas]
    bar.close()
    plan.meta["recovery"] = "bias_correction"
    plan.timings["recovery"] = round(time.perf_counter() - t0, 2)
    return plan
