"""Load traces and a discrete-event simulation of the serving loop (one accelerator, one queue).

The simulator runs the same dynamic batching rule as `ServingLoop` (a batch leaves when it holds
`max_batch` samples or its oldest request has waited `max_wait_s`, whichever comes first, and only
when the accelerator is free) and the same `RatioController`, with service times taken from a
table of *measured* per-(ratio, batch size) times: for the NPU, the artifact's cycle counts at its
clock (`benchmarks/serving.py`). It is how a target we cannot run live (the simulated NPU, a GPU
measured elsewhere) is judged under load, and how the controller is tested under a queue.

Traces are seeded (numpy Generator), so every number is reproducible.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .controller import RateMeter, RatioController


# ---- traces ------------------------------------------------------------------------------------
def poisson_trace(rate: float, n: int, seed: int = 0) -> np.ndarray:
    """Arrival times (s) of `n` requests of a Poisson process at `rate` per second."""
    if not rate > 0:
        raise ValueError(f"poisson_trace: rate must be > 0, got {rate}")
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / rate, int(n)))


def swing_trace(low: float, high: float, period_s: float, duration_s: float, seed: int = 0,
                high_first: bool = False) -> np.ndarray:
    """Poisson arrivals whose rate alternates between `low` and `high` every `period_s / 2`
    (the paper's fluctuating load between two request rates), for `duration_s` seconds."""
    if not (low > 0 and high > 0 and period_s > 0 and duration_s > 0):
        raise ValueError("swing_trace: rates, period and duration must be > 0")
    rng = np.random.default_rng(seed)
    out, t0, k = [], 0.0, 0
    half = period_s / 2.0
    while t0 < duration_s:
        rate = (high if (k % 2 == 0) == high_first else low)
        t1 = min(t0 + half, duration_s)
        m = rng.poisson(rate * (t1 - t0))
        out.append(np.sort(rng.uniform(t0, t1, m)))
        t0, k = t1, k + 1
    return np.concatenate(out) if out else np.zeros(0)


def swing_rate(t, low: float, high: float, period_s: float, high_first: bool = False):
    """The swing trace's nominal rate at time(s) t (for plots)."""
    k = np.floor(np.asarray(t, dtype=np.float64) / (period_s / 2.0)).astype(int)
    return np.where((k % 2 == 0) == high_first, high, low)


# ---- simulation --------------------------------------------------------------------------------
@dataclass
class SimResult:
    arrivals: np.ndarray
    finish: np.ndarray
    level: np.ndarray                  # level index each request was served at
    batch_start: List[float] = field(default_factory=list)
    batch_level: List[int] = field(default_factory=list)
    batch_size: List[int] = field(default_factory=list)
    switches: int = 0
    decide_s: float = 0.0              # host time spent in controller.decide (all batches)

    @property
    def latency(self) -> np.ndarray:
        return self.finish - self.arrivals


def simulate(arrivals: Sequence[float], service: Callable[[int, int], float], max_batch: int,
             max_wait_s: float, controller: Optional[RatioController] = None, static_level: int = 0,
             rate_window_s: Optional[float] = None) -> SimResult:
    """Serves `arrivals` (sorted seconds) on one accelerator; `service(level, batch)` -> seconds.

    With a `controller`, it picks each batch's level from the queue (length, oldest wait) and the
    arrival rate over `rate_window_s` (default: the controller's), and observes each batch's service
    time; without, every batch runs at `static_level`.
    """
    arr = np.asarray(arrivals, dtype=np.float64)
    n = arr.shape[0]
    finish = np.zeros(n)
    level = np.zeros(n, dtype=np.int32)
    res = SimResult(arr, finish, level)
    meter = RateMeter(rate_window_s or (controller.rate_window_s if controller else 1.0))
    q: deque = deque()
    t, i = 0.0, 0
    while i < n or q:
        if not q:
            t = max(t, arr[i])
        while i < n and arr[i] <= t:
            q.append(i)
            meter.add(arr[i])
            i += 1
        if len(q) < max_batch:
            deadline = arr[q[0]] + max_wait_s
            if deadline > t:
                nxt = arr[i] if i < n else math.inf
                if nxt < deadline:
                    t = nxt                 # admit the next arrival, then look again
                    continue
                t = deadline
        b = min(len(q), max_batch)
        if controller is not None:
            c0 = time.perf_counter()
            ratio = controller.decide(len(q), t - arr[q[0]], t, meter.rate(t))
            res.decide_s += time.perf_counter() - c0
            lv = controller.level_index(ratio)
        else:
            lv = static_level
        s = float(service(lv, b))
        if controller is not None:
            controller.observe(lv, b, s)
        res.batch_start.append(t)
        res.batch_level.append(lv)
        res.batch_size.append(b)
        t += s
        for _ in range(b):
            j = q.popleft()
            finish[j] = t
            level[j] = lv
    res.switches = controller.switches if controller is not None else 0
    return res


def summarize(res: SimResult, slo_s: float, levels: Sequence[float],
              accuracy: Optional[Dict[float, float]] = None, warmup_frac: float = 0.0) -> dict:
    """p50/p90/p99 latency, SLO attainment, share of requests per ratio, accuracy served."""
    lat = res.latency
    k = int(len(lat) * warmup_frac)
    lat, lv = lat[k:], res.level[k:]
    out = {"requests": int(len(lat)), "p50_ms": float(np.percentile(lat, 50) * 1e3),
           "p90_ms": float(np.percentile(lat, 90) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
           "mean_ms": float(lat.mean() * 1e3), "slo_attainment": float(np.mean(lat <= slo_s)),
           "switches": int(res.switches),
           "mean_batch": float(np.mean(res.batch_size)) if res.batch_size else 0.0,
           "controller_us_per_batch": res.decide_s / max(len(res.batch_size), 1) * 1e6,
           "served_share": {repr(float(levels[j])): float(np.mean(lv == j)) for j in range(len(levels))}}
    if res.arrivals.size > 1:
        out["offered_rate"] = float((res.arrivals.size - 1) / (res.arrivals[-1] - res.arrivals[0]))
    if accuracy:
        acc = np.array([accuracy[float(levels[j])] for j in range(len(levels))])
        out["accuracy_served"] = float(np.mean(acc[lv]))
    return out
