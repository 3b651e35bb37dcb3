"""Cross-layer ordering of lowering steps from measured per-layer error curves.

`range` (schedule.proportional_schedule) lowers every layer at the same pace. `sensitivity`
measures, on calibration data at the model output, how the error grows as each layer alone is
lowered group by group, then orders all steps globally by error added per MAC moved to 4-bit,
assuming errors of different layers add up. It is a one-shot, additive approximation of the greedy
search (which re-measures after every step), cheap enough for large models.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np


def curve_points(n_groups: int, max_points: int) -> List[int]:
    """Counts at which a layer's error curve is measured (always including 1..n when n is small)."""
    if n_groups <= max_points:
        return list(range(1, n_groups + 1))
    pts = np.unique(np.round(np.linspace(0, n_groups, max_points + 1)[1:]).astype(int))
    return [int(p) for p in pts if p > 0]


def measure_curves(n_groups: Sequence[int], evaluate: Callable[[np.ndarray], float], max_points: int = 8,
                   progress=None) -> List[np.ndarray]:
    """curves[l][k]: error with the first k groups of layer l in 4-bit and every other layer INT8.

    Unmeasured counts are linearly interpolated between measured ones.
    """
    L = len(n_groups)
    jobs = [(l, k) for l in range(L) for k in curve_points(n_groups[l], max_points)]
    if progress is not None:
        jobs = progress(jobs)
    measured = {l: {0: 0.0} for l in range(L)}
    for l, k in jobs:
        counts = np.zeros(L, dtype=np.int32)
        counts[l] = k
        measured[l][k] = float(evaluate(counts))
    curves = []
    for l in range(L):
        ks = sorted(measured[l])
        curves.append(np.interp(np.arange(n_groups[l] + 1), ks, [measured[l][k] for k in ks]))
    return curves


def sensitivity_schedule(curves: Sequence[np.ndarray], group_macs: Sequence[np.ndarray]) -> List[int]:
    """Global lowering order: repeatedly take the run of next groups (in some layer) with the smallest
    average error increase per MAC; runs handle non-convex curves (a costly step followed by cheap ones)."""
    L = len(curves)
    nxt = [0] * L
    cum = [np.concatenate([[0], np.cumsum(g.astype(np.float64))]) for g in group_macs]
    schedule: List[int] = []
    total = sum(len(g) for g in group_macs)
    while len(schedule) < total:
        best = None
        for l in range(L):
            k = nxt[l]
            n = len(group_macs[l])
            if k >= n:
                continue
            for j in range(k + 1, n + 1):
                macs = cum[l][j] - cum[l][k]
                slope = (max(curves[l][j] - curves[l][k], 0.0)) / max(macs, 1.0)
                key = (slope, -(j - k), l)
                if best is None or key < best[0]:
                    best = (key, l, j)
        _, l, j = best
        schedule.extend([l] * (j - nxt[l]))
        nxt[l] = j
    return schedule
