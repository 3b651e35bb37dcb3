"""The serving loop: a queue, dynamic batching and the ratio controller around one CompiledModel.

One worker thread owns the `CompiledModel` (its VM and `set_ratio` are not meant to be shared
between threads); any number of threads `submit` requests and wait on the returned futures. A
batch leaves when it holds `max_batch` samples or its oldest request has waited `max_wait_s`; the
controller picks its ratio from the queue (length, oldest wait, arrival rate) and the batch times
measured so far, `set_ratio` applies it (a cached dictionary lookup), and the batch's measured
time goes back to the controller. A request whose future was cancelled (its client went away) is
dropped before it is run and costs nobody else anything.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError, FlexiQError
from .controller import RateMeter, RatioController


class _Request:
    __slots__ = ("x", "n", "t", "future")

    def __init__(self, x, t):
        self.x = x
        self.n = int(x.shape[0])
        self.t = t
        self.future = Future()


class ServingLoop:
    """Dynamic batching + adaptive ratio around one CompiledModel.

    cm: the artifact; slo_s: latency objective (s); max_batch: samples per batch; max_wait_s: how
    long the oldest request may wait for a batch to fill (default: 1/20 of the SLO, at most 1 ms);
    levels: ratios to choose from (default: the plan's levels); controller: a ready
    `RatioController` (default: one built from the other arguments); warmup: time every level at
    batch 1 and `max_batch` before serving, so the controller starts from measured numbers.
    """

    def __init__(self, cm, slo_s: float, max_batch: int = 8, max_wait_s: Optional[float] = None,
                 levels: Optional[Sequence[float]] = None, controller: Optional[RatioController] = None,
                 warmup: bool = True, latency_window: int = 10000, clock=time.perf_counter):
        if int(max_batch) < 1:
            raise FlexiQError(f"max_batch must be >= 1, got {max_batch}")
        self.cm = cm
        self.max_batch = int(max_batch)
        self.max_wait_s = float(min(slo_s / 20.0, 0.001) if max_wait_s is None else max_wait_s)
        if self.max_wait_s < 0:
            raise FlexiQError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if levels is None:
            levels = sorted(set([0.0] + [float(r) for r in cm.plan.levels]))
        self.controller = controller or RatioController(levels, slo_s, max_batch=self.max_batch,
                                                            max_wait_s=self.max_wait_s)
        self.levels = list(self.controller.levels)
        self.clock = clock
        self.meter = RateMeter(self.controller.rate_window_s)
        self._q: deque = deque()
        self._queued = 0
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        # statistics (read by the metrics endpoint; written by the worker under _stats_lock)
        self._stats_lock = threading.Lock()
        self.requests = {r: 0 for r in self.levels}
        self.samples = {r: 0 for r in self.levels}
        self.batches = {r: 0 for r in self.levels}
        self.cancelled = 0
        self.failed = 0
        self.latencies: deque = deque(maxlen=latency_window)
        self.switch_overhead_s = {"last": 0.0, "max": 0.0, "sum": 0.0, "batches": 0}
        self.batch_log: deque = deque(maxlen=latency_window)    # (t_start, ratio, batch, service_s)
        if warmup:
            self.warmup()

    # ---- setup -----------------------------------------------------------------------------------
    def warmup(self, repeats: int = 3) -> None:
        """Measure every level at batch 1 and `max_batch` (median of `repeats`) for the controller."""
        x = np.zeros((self.max_batch,) + tuple(self.cm.input_shape), np.float32)
        for lv, r in enumerate(self.levels):
            self.cm.set_ratio(r)
            for b in sorted({1, self.max_batch}):
                self.cm(x[:b])                          # first call of a size pays one-off costs
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    self.cm(x[:b])
                    ts.append(time.perf_counter() - t0)
                self.controller.observe(lv, b, float(np.median(ts)))
        self.cm.set_ratio(self.controller.ratio)

    def start(self) -> "ServingLoop":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flexiq-serving-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:                                    # whatever is left is answered, not lost
            while self._q:
                req = self._q.popleft()
                if not req.future.done():
                    req.future.set_exception(FlexiQError("server shutting down"))
            self._queued = 0

    # ---- requests --------------------------------------------------------------------------------
    def submit(self, x) -> Future:
        """Queue `x` (N, *input_shape) float32; the future gives the (N, ...) output."""
        arr = self.cm._check(x)
        if not np.all(np.isfinite(arr)):
            raise DataError("input contains NaN or infinity")
        req = _Request(arr, self.clock())
        with self._cv:
            if self._stop:
                raise FlexiQError("server shutting down")
            self._q.append(req)
            self._queued += req.n
            self.meter.add(req.t, req.n)
            self._cv.notify()
        return req.future

    @property
    def queue_length(self) -> int:
        return self._queued

    # ---- the worker ------------------------------------------------------------------------------
    def _take_batch(self):
        """Blocks until a batch is due; returns (requests, queued samples, oldest wait, now)."""
        with self._cv:
            while True:
                while not self._q and not self._stop:
                    self._cv.wait(0.1)
                if self._stop:
                    return None
                while self._q and self._q[0].future.cancelled():      # clients that left
                    self._queued -= self._q.popleft().n
                    self.cancelled += 1
                if not self._q:
                    continue
                now = self.clock()
                wait = self._q[0].t + self.max_wait_s - now
                if self._queued >= self.max_batch or wait <= 0:
                    break
                self._cv.wait(wait)
            queued, delay = self._queued, now - self._q[0].t
            batch, n = [], 0
            while self._q and (not batch or n + self._q[0].n <= self.max_batch):
                req = self._q.popleft()
                self._queued -= req.n
                if not req.future.set_running_or_notify_cancel():
                    self.cancelled += 1
                    continue
                batch.append(req)
                n += req.n
            return batch, queued, delay, now

    def _run(self):
        while True:
            got = self._take_batch()
            if got is None:
                return
            batch, queued, delay, now = got
            if not batch:
                continue
            t0 = time.perf_counter()
            ratio = self.controller.decide(queued, delay, now, self.meter.rate(now))
            self.cm.set_ratio(ratio)
            overhead = time.perf_counter() - t0
            lv = self.controller.level
            x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
            t1 = time.perf_counter()
            try:
                y = self.cm(x)
            except Exception as e:  # noqa: BLE001  one bad batch must not stop the server
                with self._stats_lock:
                    self.failed += len(batch)
                for r in batch:
                    r.future.set_exception(e)
                continue
            service = time.perf_counter() - t1
            self.controller.observe(lv, x.shape[0], service)
            done = self.clock()
            with self._stats_lock:
                self.batches[ratio] += 1
                so = self.switch_overhead_s
                so["last"], so["max"] = overhead, max(so["max"], overhead)
                so["sum"] += overhead
                so["batches"] += 1
                self.batch_log.append((now, ratio, int(x.shape[0]), service))
                for r in batch:
                    self.requests[ratio] += 1
                    self.samples[ratio] += r.n
                    self.latencies.append(done - r.t)
            s = 0
            for r in batch:
                r.future.set_result((y[s:s + r.n], ratio))
                s += r.n

    # ---- introspection ---------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._stats_lock:
            lat = np.array(self.latencies) if self.latencies else np.zeros(0)
            so = dict(self.switch_overhead_s)
            out = {"ratio": self.controller.ratio, "pinned": self.controller.state()["pinned"],
                   "queue_length": self._queued, "slo_s": self.controller.slo_s,
                   "requests": dict(self.requests), "samples": dict(self.samples), "batches": dict(self.batches),
                   "cancelled": self.cancelled, "failed": self.failed, "switches": self.controller.switches,
                   "switch_overhead_s": {"last": so["last"], "max": so["max"],
                                         "mean": so["sum"] / so["batches"] if so["batches"] else 0.0,
                                         "sum": so["sum"]},
                   "arrival_rate": self.meter.rate(self.clock())}
        if lat.size:
            out["latency_s"] = {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                                "p99": float(np.percentile(lat, 99)), "count": int(lat.size)}
        return out
