"""Scores per-layer 4-bit counts at the model output, with one compiled model and no recompiling.

The mixed model is compiled once (counts are a run-time input), and every candidate runs through
it on a fixed calibration batch; the score is the mean squared distance of its logits from the
INT8 model's (counts all zero), relative to the INT8 logits' mean square.
"""
from __future__ import annotations

import numpy as np
import tvm

from .quant.plan import Plan


class OutputDistance:
    def __init__(self, model, plan: Plan, inputs: np.ndarray, batch_size: int = 64, target: str = "llvm"):
        from .api import compile

        n = inputs.shape[0]
        self.batch = max(1, min(batch_size, n))
        n -= n % self.batch
        self.cm = compile(model, plan, target=target, batch_size=self.batch)
        self.chunks = [tvm.runtime.tensor(np.ascontiguousarray(inputs[s:s + self.batch]))
                       for s in range(0, n, self.batch)]
        self.evaluations = 0
        self.reference = self.logits(np.zeros(plan.num_layers, np.int32))
        self.norm = float(np.mean(self.reference.astype(np.float64) ** 2)) or 1.0

    def logits(self, counts) -> np.ndarray:
        t = tvm.runtime.tensor(np.asarray(counts, np.int32))
        self.evaluations += 1
        return np.concatenate([self.cm._main(c, t).numpy() for c in self.chunks])

    def __call__(self, counts) -> float:
        y = self.logits(counts).astype(np.float64)
        return float(np.mean((y - self.reference) ** 2) / self.norm)
