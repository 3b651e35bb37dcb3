"""Scores candidate 4-bit group sets at the model output, with one compiled model and no recompiling.

The search build makes the per-layer counts, group-rank tables and weight-shift tables run-time
inputs (`flexiq_rewrite(runtime_tables=True)`), so any candidate (which groups of which layer are
4-bit) runs through the same executable. The score is the distance of the candidate's logits from
the INT8 model's (all counts zero) on a fixed calibration batch: KL of the softmax outputs
(default) or the relative MSE of the logits.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import tvm

from ..quant.plan import Plan

METRICS = ("mse", "kl")


class OutputDistance:
    def __init__(self, model, plan: Plan, inputs: np.ndarray, batch_size: int = 64, target: str = "llvm",
                 metric: str = "kl"):
        from ..passes.flexiq_rewrite import flexiq_rewrite
        from ..targets import get_target

        if metric not in METRICS:
            raise ValueError(f"fitness metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        self.plan = plan
        n = inputs.shape[0]
        if getattr(model, "fixed_batch", None):
            # the graph pins its batch: every input is scored, the last chunk padded
            self.batch = model.fixed_batch
            pad = -n % self.batch
            if pad:
                inputs = np.concatenate([inputs, np.zeros((pad,) + inputs.shape[1:], inputs.dtype)])
        else:
            self.batch = max(1, min(batch_size, n))
            n -= n % self.batch
        self.samples = n
        tgt = get_target(target)
        mod, layers = model.at(self.batch)
        mod = flexiq_rewrite(mod, layers, plan, self.batch, runtime_tables=True)
        self.vm = tvm.relax.VirtualMachine(tgt.build(mod), tgt.device())
        self._main = self.vm["main"]
        self.chunks = [tvm.runtime.tensor(np.ascontiguousarray(inputs[s:s + self.batch]))
                       for s in range(0, inputs.shape[0] - inputs.shape[0] % self.batch, self.batch)]
        self._base = [(tvm.runtime.tensor(l.rank.astype(np.int32)),
                       tvm.runtime.tensor(np.ascontiguousarray(l.weight_shift, np.int32))) for l in plan.layers]
        self._table_cache: Dict = {}
        self.evaluations = 0
        self.reference = self.logits(np.zeros(plan.num_layers, np.int32))
        self.norm = float(np.mean(self.reference.astype(np.float64) ** 2)) or 1.0
        if metric == "kl":
            z = self.reference.astype(np.float64)
            z = z - z.max(-1, keepdims=True)
            self._ref_logp = z - np.log(np.exp(z).sum(-1, keepdims=True))

    def _tables(self, layer: int, perm: Optional[Sequence[int]]):
        if perm is None:
            return self._base[layer]
        key = (layer, tuple(int(p) for p in perm))
        hit = self._table_cache.get(key)
        if hit is None:
            lp = self.plan.layers[layer].reorder_groups(perm)
            hit = (tvm.runtime.tensor(lp.rank.astype(np.int32)),
                   tvm.runtime.tensor(np.ascontiguousarray(lp.weight_shift, np.int32)))
            if len(self._table_cache) > 4096:
                self._table_cache.clear()
            self._table_cache[key] = hit
        return hit

    def logits(self, counts, perms=None) -> np.ndarray:
        """Model output with `counts[l]` leading groups of layer l in 4-bit, in the group order
        `perms[l]` (ids of the plan's groups; None keeps the plan's order)."""
        args = [tvm.runtime.tensor(np.asarray(counts, np.int32))]
        for l in range(self.plan.num_layers):
            args.extend(self._tables(l, None if perms is None else perms[l]))
        self.evaluations += 1
        return np.concatenate([self._main(c, *args).numpy() for c in self.chunks])[: self.samples]

    def score(self, y: np.ndarray) -> float:
        y = y.astype(np.float64)
        if self.metric == "mse":
            return float(np.mean((y - self.reference) ** 2) / self.norm)
        z = y - y.max(-1, keepdims=True)
        logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(np.mean(np.sum(np.exp(self._ref_logp) * (self._ref_logp - logq), axis=-1)))

    def __call__(self, counts, perms=None) -> float:
        return self.score(self.logits(counts, perms))

    def low_sets(self, sets) -> float:
        """Score of a candidate given as per-layer sets of 4-bit group ids."""
        counts, perms = [], []
        for l, s in enumerate(sets):
            low = sorted(int(g) for g in s)
            high = [g for g in range(self.plan.layers[l].n_groups) if g not in set(low)]
            counts.append(len(low))
            perms.append(low + high)
        return self(np.asarray(counts, np.int32), perms)
