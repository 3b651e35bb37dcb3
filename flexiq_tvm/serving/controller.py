"""The ratio controller: which 4-bit ratio the next batch runs at (METHOD section 6).

Pure Python over measured numbers (no TVM, no clock of its own: every call is given `now`), so the
serving loop, the discrete-event simulator and the unit tests drive the very same object.

Policy (the paper's: the lowest ratio expected to meet the SLO given the queue state):

* `ServiceTimes` keeps, per (ratio level, batch size), an exponentially weighted mean of the batch
  service times the loop has *measured*. A pair never measured is estimated from the same level's
  other batch sizes, else from the nearest lower level (a higher ratio is assumed no faster until
  measured): the controller never invents a speedup.
* For each level, lowest first, the controller predicts the worst latency of the requests now
  queued if they were served at that level in batches of `max_batch` (the oldest request of each
  batch has waited in proportion to its place in the queue, linear arrivals between the oldest and
  the newest), and checks the level can keep up with the arrival rate: its utilisation
  `rate * t(B) / B` is below `max_utilization`, and the p90 latency it would reach under that rate
  at steady state (`steady_p90`: Kingman's approximation with a full batch as the job) is within
  the bound too (the rate is ignored until the meter has seen half a window). The lowest level whose
  predictions are within `headroom * slo` is the target. The steady-state check, not a fixed
  utilisation cap, is what says how close to saturation a level may run: with a loose SLO a level
  at 91% load serves well, with a tight one it does not, and a cap of 80-90% made the controller
  jump to all-4-bit where a lower ratio met the SLO (and cost accuracy for nothing).
  If none is, the level that drains the queue fastest runs, or INT8 if that one beats INT8 by
  less than 2% (on a target where 4-bit is no faster, the CPU, overload does not cost accuracy for
  nothing); while a level is still unmeasured, the top level runs, which measures it.
* **Hysteresis**: a higher target is taken at once (latency is at stake); a lower level is taken
  only after it has met the stricter `down_headroom * slo` (queued and steady-state predictions
  both) and `down_utilization` bounds on `down_after` consecutive
  decisions spanning at least `down_hold_s` seconds, and then only down to the highest level that
  qualified during that window. Two thresholds plus a dwell time is what stops a steady load from
  flipping between two adjacent levels.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple


class ControllerError(ValueError):
    """A bad controller setting or input (names the parameter at fault)."""


class ServiceTimes:
    """Measured batch service times per (level index, batch size), EWMA-smoothed."""

    def __init__(self, num_levels: int, alpha: float = 0.2):
        if num_levels < 1:
            raise ControllerError("ServiceTimes: need at least one ratio level")
        if not 0.0 < alpha <= 1.0:
            raise ControllerError(f"ServiceTimes: alpha must be in (0, 1], got {alpha}")
        self.num_levels = num_levels
        self.alpha = alpha
        self._t: List[Dict[int, float]] = [dict() for _ in range(num_levels)]
        self.samples: List[Dict[int, int]] = [dict() for _ in range(num_levels)]

    def observe(self, level: int, batch: int, seconds: float) -> None:
        if not 0 <= level < self.num_levels:
            raise ControllerError(f"ServiceTimes.observe: level {level} is outside 0..{self.num_levels - 1}")
        if batch < 1:
            raise ControllerError(f"ServiceTimes.observe: batch size must be >= 1, got {batch}")
        if not (seconds >= 0.0 and math.isfinite(seconds)):
            raise ControllerError(f"ServiceTimes.observe: service time must be a finite number >= 0, got {seconds}")
        old = self._t[level].get(batch)
        self._t[level][batch] = seconds if old is None else old + self.alpha * (seconds - old)
        self.samples[level][batch] = self.samples[level].get(batch, 0) + 1

    def measured(self, level: int, batch: int) -> Optional[float]:
        return self._t[level].get(batch)

    def _from_level(self, level: int, batch: int) -> Optional[float]:
        t = self._t[level]
        if not t:
            return None
        if batch in t:
            return t[batch]
        sizes = sorted(t)
        i = bisect.bisect_left(sizes, batch)
        if i == 0:                      # smaller than any measured batch: no faster than the smallest
            return t[sizes[0]]
        if i == len(sizes):             # larger than any measured: per-sample cost of the largest
            b = sizes[-1]
            return t[b] * batch / b
        lo, hi = sizes[i - 1], sizes[i]
        return t[lo] + (t[hi] - t[lo]) * (batch - lo) / (hi - lo)

    def estimate(self, level: int, batch: int) -> Optional[float]:
        """Seconds for one batch of `batch` at `level`; None when nothing at all was measured."""
        est = self._from_level(level, batch)
        if est is not None:
            return est
        for lv in range(level - 1, -1, -1):          # no faster than the nearest measured lower level
            est = self._from_level(lv, batch)
            if est is not None:
                return est
        for lv in range(level + 1, self.num_levels):
            est = self._from_level(lv, batch)
            if est is not None:
                return est
        return None

    def table(self) -> Dict[int, Dict[int, float]]:
        return {lv: dict(sorted(t.items())) for lv, t in enumerate(self._t)}


class RateMeter:
    """Arrival rate over a sliding time window (arrivals per second)."""

    def __init__(self, window_s: float):
        if not window_s > 0:
            raise ControllerError(f"RateMeter: window_s must be > 0, got {window_s}")
        self.window_s = float(window_s)
        self._t: deque = deque()
        self._first: Optional[float] = None

    def add(self, now: float, n: int = 1) -> None:
        if self._first is None:
            self._first = now
        for _ in range(n):
            self._t.append(now)

    def rate(self, now: float) -> Optional[float]:
        """Arrivals per second over the window; None until half a window has been seen (a rate from a
        handful of first arrivals would be noise, and would push the ratio up for nothing)."""
        lo = now - self.window_s
        while self._t and self._t[0] < lo:
            self._t.popleft()
        if self._first is None or now - self._first < self.window_s / 2:
            return None
        return len(self._t) / min(self.window_s, now - self._first)


@dataclass
class Decision:
    """One decision, kept for tests and for the serving metrics."""
    now: float
    level: int
    target: int
    queue_len: int
    queue_delay: float
    arrival_rate: Optional[float]
    predicted: Optional[float]          # predicted worst latency at the chosen level (s)


@dataclass
class RatioController:
    """Chooses the ratio level of each batch; see the module docstring for the policy.

    levels: the ratios the artifact serves (ascending after construction; 0.0 = INT8).
    slo_s: the latency objective (seconds) the controller aims the queued requests' latency at.
    max_batch: the serving loop's largest batch (samples).
    max_wait_s: the loop's longest wait for a batch to fill; without it the steady-state prediction
    leaves out the time a request waits for its batch to form (it cannot bound it at low rates).
    """

    levels: Sequence[float]
    slo_s: float
    max_batch: int = 8
    headroom: float = 0.8
    down_headroom: float = 0.5
    down_after: int = 8
    down_hold_s: Optional[float] = None        # default: 2 x SLO
    max_utilization: float = 0.97
    down_utilization: float = 0.95
    max_wait_s: Optional[float] = None         # the loop's batching wait: bounds the batch-forming delay
    rate_window_s: Optional[float] = None      # arrival-rate window for the caller's RateMeter; default 25 x SLO
    alpha: float = 0.2
    keep_history: int = 0                      # >0: keep the last N decisions in `history`
    fastest_tolerance: float = 0.02            # overloaded: a level less than this faster than INT8 is not faster
    times: ServiceTimes = field(init=False)

    def __post_init__(self):
        lv = [float(r) for r in self.levels]
        if not lv:
            raise ControllerError("RatioController: levels is empty")
        for r in lv:
            if not 0.0 <= r <= 1.0:
                raise ControllerError(f"RatioController: level {r} is outside [0, 1]")
        if len(set(lv)) != len(lv):
            raise ControllerError(f"RatioController: duplicate levels in {lv}")
        self.levels = sorted(lv)
        if not (self.slo_s > 0 and math.isfinite(self.slo_s)):
            raise ControllerError(f"RatioController: slo_s must be a positive number, got {self.slo_s}")
        if int(self.max_batch) < 1:
            raise ControllerError(f"RatioController: max_batch must be >= 1, got {self.max_batch}")
        self.max_batch = int(self.max_batch)
        if not 0 < self.down_headroom <= self.headroom:
            raise ControllerError(f"RatioController: need 0 < down_headroom ({self.down_headroom}) <= headroom "
                                  f"({self.headroom}): the band between them is the hysteresis")
        if self.down_after < 1:
            raise ControllerError(f"RatioController: down_after must be >= 1, got {self.down_after}")
        if not 0 < self.down_utilization <= self.max_utilization <= 1:
            raise ControllerError(f"RatioController: need 0 < down_utilization ({self.down_utilization}) <= "
                                  f"max_utilization ({self.max_utilization}) <= 1")
        if self.max_wait_s is not None and not (self.max_wait_s >= 0 and math.isfinite(self.max_wait_s)):
            raise ControllerError(f"RatioController: max_wait_s must be a finite number >= 0, got {self.max_wait_s}")
        if self.rate_window_s is None:
            self.rate_window_s = 25.0 * self.slo_s
        if self.down_hold_s is None:
            self.down_hold_s = 2.0 * self.slo_s
        self.times = ServiceTimes(len(self.levels), self.alpha)
        self.level = 0
        self.pinned: Optional[int] = None
        self.switches = 0
        self._below_since: Optional[float] = None
        self._below_count = 0
        self._below_max = 0
        self.history: deque = deque(maxlen=self.keep_history or None) if self.keep_history else deque(maxlen=0)

    # ---- inputs ----------------------------------------------------------------------------------
    def observe(self, level: int, batch: int, seconds: float) -> None:
        """A measured batch: `batch` samples served at level index `level` in `seconds`."""
        self.times.observe(level, batch, seconds)

    def level_index(self, ratio: float) -> int:
        for i, r in enumerate(self.levels):
            if abs(r - float(ratio)) < 1e-9:
                return i
        raise ControllerError(f"ratio {ratio} is not one of the served levels {self.levels}")

    def pin(self, ratio: Optional[float]) -> None:
        """Fix the ratio (an admin override); None returns control to the policy."""
        if ratio is None:
            if self.pinned is not None:   # restart from INT8: the policy raises it at once if needed
                self.level = 0
                self._reset_down()
            self.pinned = None
            return
        self.pinned = self.level_index(ratio)

    @property
    def ratio(self) -> float:
        return self.levels[self.level]

    # ---- the policy ------------------------------------------------------------------------------
    def predict(self, level: int, queue_len: int, queue_delay: float) -> Optional[float]:
        """Worst predicted latency (s) of the requests now queued, served at `level`; None: unknown."""
        if queue_len <= 0:
            return 0.0
        B = self.max_batch
        done, t_done, worst = 0, 0.0, 0.0
        while done < queue_len:
            b = min(B, queue_len - done)
            t = self.times.estimate(level, b)
            if t is None:
                return None
            t_done += t
            # the oldest request of this batch waited in proportion to its place in the queue
            waited = queue_delay * (1.0 - done / queue_len)
            worst = max(worst, waited + t_done)
            done += b
        return worst

    def steady_p90(self, level: int, rate: float) -> Optional[float]:
        """Predicted p90 latency (s) of a steady Poisson load of `rate` requests/s served at `level`
        in full batches; inf when the level cannot keep up, None when it was never measured.

        Kingman's G/D/1 approximation with one batch as the job: batches arrive with Erlang-B gaps
        (squared coefficient of variation 1/B), service is deterministic, so the mean queueing
        delay is rho / (1 - rho) * t(B) / (2B); its 90th percentile is taken as ln(10) times that
        mean (an exponential tail). Add the batch's service time and, when the loop's `max_wait_s`
        is known, the mean time a request waits for its batch to fill ((B-1) / 2 rate, at most
        max_wait_s).
        """
        tB = self.times.estimate(level, self.max_batch)
        return None if tB is None else self._steady_p90(tB, rate)

    def _steady_p90(self, tB: float, rate: float) -> float:
        """steady_p90 from the level's full-batch service time `tB` (s)."""
        B = self.max_batch
        if rate <= 0:
            return tB
        rho = rate * tB / B
        if rho >= 1.0:
            return math.inf
        wait = rho / (1.0 - rho) * tB / (2.0 * B)
        form = 0.0 if self.max_wait_s is None else min((B - 1) / (2.0 * rate), self.max_wait_s)
        return tB + form + math.log(10.0) * wait

    def _qualifies(self, level: int, queue_len: int, queue_delay: float, rate: Optional[float],
                   bound: float, util: float) -> Tuple[bool, Optional[float]]:
        p = self.predict(level, queue_len, queue_delay)
        if p is None:
            return False, None
        if p > bound:
            return False, p
        if rate:
            tB = self.times.estimate(level, self.max_batch)
            if tB is not None and (rate * tB / self.max_batch > util or self._steady_p90(tB, rate) > bound):
                return False, p
        return True, p

    def target(self, queue_len: int, queue_delay: float, rate: Optional[float] = None,
               strict: bool = False) -> Tuple[int, Optional[float]]:
        """Lowest level meeting the (strict: down) bound. When none does: the top level if some level
        was never measured (so it gets measured), else the level that drains the queue fastest, unless it
        beats INT8 by less than `fastest_tolerance` (on a target where 4-bit is no faster, as the CPU,
        overload must not cost accuracy for nothing)."""
        bound = (self.down_headroom if strict else self.headroom) * self.slo_s
        util = self.down_utilization if strict else self.max_utilization
        preds = []
        for lv in range(len(self.levels)):
            ok, p = self._qualifies(lv, queue_len, queue_delay, rate, bound, util)
            if ok:
                return lv, p
            preds.append(p)
        top = len(self.levels) - 1
        if any(not self.times.table()[lv] for lv in range(len(self.levels))) or any(p is None for p in preds):
            return top, preds[top]
        drain = [self.predict(lv, queue_len, 0.0) for lv in range(len(self.levels))]   # the wait so far is sunk
        best = min(drain)
        if best * (1 + self.fastest_tolerance) >= drain[0]:      # 4-bit buys (next to) nothing here
            return 0, preds[0]
        lv = drain.index(best)
        return lv, preds[lv]

    def decide(self, queue_len: int, queue_delay: float, now: float, arrival_rate: Optional[float] = None) -> float:
        """The ratio for the next batch.

        queue_len: samples waiting (the batch about to run included); queue_delay: seconds the oldest
        of them has waited; now: the caller's clock (s); arrival_rate: recent arrivals per second.
        """
        if queue_len < 0 or not math.isfinite(queue_delay) or queue_delay < 0:
            raise ControllerError(f"decide: bad queue state (length {queue_len}, delay {queue_delay})")
        if self.pinned is not None:
            new, tgt, pred = self.pinned, self.pinned, None
        else:
            tgt, pred = self.target(queue_len, queue_delay, arrival_rate)
            new = self.level
            if tgt > self.level:                         # up: at once
                new = tgt
                self._reset_down()
            else:
                down, _ = self.target(queue_len, queue_delay, arrival_rate, strict=True)
                if down < self.level:
                    if self._below_since is None:
                        self._below_since = now
                        self._below_max = down
                    self._below_count += 1
                    self._below_max = max(self._below_max, down)
                    if self._below_count >= self.down_after and now - self._below_since >= self.down_hold_s:
                        new = self._below_max
                        self._reset_down()
                else:
                    self._reset_down()
        if new != self.level:
            self.switches += 1
            self.level = new
        if self.history.maxlen:
            self.history.append(Decision(now, self.level, tgt, queue_len, queue_delay, arrival_rate, pred))
        return self.levels[self.level]

    def _reset_down(self):
        self._below_since = None
        self._below_count = 0
        self._below_max = 0

    def state(self) -> dict:
        return {"ratio": self.ratio, "level": self.level, "pinned": None if self.pinned is None else
                self.levels[self.pinned], "switches": self.switches, "slo_s": self.slo_s,
                "service_times_s": {repr(self.levels[lv]): {str(b): t for b, t in row.items()}
                                    for lv, row in self.times.table().items()}}
