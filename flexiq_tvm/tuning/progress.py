"""A tqdm bar over measured trials, with the best latency so far per task and overall."""
from __future__ import annotations

import math
from typing import Callable, List, Optional

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms


@derived_object
class TrialProgress(ms.measure_callback.PyMeasureCallback):
    """Measure callback: advances a tqdm bar by the trials of each batch, shows the best-so-far
    latency, and reports ``(task_id, n_trials, best_seconds)`` to ``on_batch`` (the ledger)."""

    def __init__(self, total: int, names: List[str], enabled: bool = True,
                 on_batch: Optional[Callable[[int, int, float], None]] = None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="trial", desc="tuning", disable=not enabled, dynamic_ncols=True)
        self.names = list(names)
        self.best = [math.inf] * len(names)
        self.trials = [0] * len(names)
        self.on_batch = on_batch
        self.index = None      # task ids of the current tune_tasks call -> indices into names

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        if self.index is not None:
            task_id = self.index[task_id]
        best = math.inf
        for br, rr in zip(builder_results, runner_results):
            if br.error_msg is None and rr.error_msg is None and rr.run_secs:
                secs = [float(s) for s in rr.run_secs]
                best = min(best, sum(secs) / len(secs))
        n = len(measure_candidates)
        self.trials[task_id] += n
        self.best[task_id] = min(self.best[task_id], best)
        overall = sum(b * 1 for b in self.best if math.isfinite(b))
        self.bar.set_postfix_str(f"{self.names[task_id][:28]} best {_us(self.best[task_id])}, "
                                 f"sum of bests {overall * 1e6:.1f} us", refresh=False)
        self.bar.update(n)
        if self.on_batch is not None:
            self.on_batch(task_id, n, best)

    def close(self):
        self.bar.close()


def _us(seconds: float) -> str:
    return "-" if not math.isfinite(seconds) else f"{seconds * 1e6:.1f} us"
