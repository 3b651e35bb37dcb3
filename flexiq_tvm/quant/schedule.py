"""From per-layer lowering orders to model-level ratios (METHOD section 3).

A *lowering schedule* is the sequence of layer indices in which groups are lowered, one group per
step; its prefixes are exactly the nested configurations. A ratio level is a prefix length, and the
model-level ratio is the fraction of MACs computed in 4-bit. Any prefix is reachable at run time,
which is what "any ratio at group granularity" means.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

STANDARD_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def proportional_schedule(groups_per_layer: Sequence[int]) -> List[int]:
    """Lower every layer at the same pace: step j of layer l happens at fraction (j+1)/n_l.

    This is the schedule of the plain value-range search (no inter-layer error model): each layer
    holds about the same share of 4-bit groups at every ratio.
    """
    keyed = [((j + 1) / n, l, j) for l, n in enumerate(groups_per_layer) for j in range(n)]
    keyed.sort()
    return [l for _, l, _ in keyed]


def counts_at(schedule: Sequence[int], prefix: int, num_layers: int) -> np.ndarray:
    return np.bincount(np.asarray(schedule[:prefix], dtype=np.int64), minlength=num_layers).astype(np.int32)


def cumulative_mac_share(schedule: Sequence[int], group_macs_per_layer: Sequence[np.ndarray]) -> np.ndarray:
    """MAC share after each prefix length 0..len(schedule)."""
    total = float(sum(int(g.sum()) for g in group_macs_per_layer))
    next_group = [0] * len(group_macs_per_layer)
    share = np.zeros(len(schedule) + 1)
    acc = 0
    for i, l in enumerate(schedule):
        acc += int(group_macs_per_layer[l][next_group[l]])
        next_group[l] += 1
        share[i + 1] = acc / total if total else 0.0
    return share


def prefix_for_ratio(share: np.ndarray, ratio: float) -> int:
    """The prefix whose MAC share is closest to `ratio` (the lower one on a tie)."""
    ratio = check_ratio(ratio)
    i = int(np.searchsorted(share, ratio))
    if i >= len(share):
        return len(share) - 1
    if i > 0 and (ratio - share[i - 1]) <= (share[i] - ratio):
        return i - 1
    return i


def check_ratio(ratio) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}") from None
    if not (0.0 <= r <= 1.0) or r != r:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    return r


def level_prefixes(share: np.ndarray, levels: Sequence[float]) -> Dict[float, int]:
    return {float(r): prefix_for_ratio(share, r) for r in levels}
