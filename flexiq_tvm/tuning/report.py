"""The tune report: what was tuned, what was skipped, and why."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional


@dataclass
class TaskResult:
    name: str
    kind: str                     # "flexiq" | "fused"
    kernel: Optional[str]
    weight: int
    status: str                   # "tuned" | "done before" | "space exhausted" | "not tunable"
    trials: int = 0               # trials measured in this run
    trials_total: int = 0         # trials in the database for this workload (all runs)
    best_us: Optional[float] = None
    note: Optional[str] = None


@dataclass
class TuneReport:
    model: str
    target: str
    target_key: str
    db: str
    trials_per_task: int
    ratios: List[float]
    ratio_note: str
    batch_size: int
    seed: int
    rpc: Optional[str] = None
    tasks: List[TaskResult] = field(default_factory=list)
    trials: int = 0               # measured in this run
    wall_s: float = 0.0

    @property
    def tuned(self) -> List[TaskResult]:
        return [t for t in self.tasks if t.status == "tuned"]

    @property
    def skipped(self) -> List[TaskResult]:
        return [t for t in self.tasks if t.status in ("done before", "space exhausted")]

    def to_dict(self) -> dict:
        d = asdict(self)
        for t in d["tasks"]:
            if t["best_us"] is not None and not math.isfinite(t["best_us"]):
                t["best_us"] = None
        return d

    def format(self) -> str:
        lines = [f"tuned {self.model} for {self.target} ({self.target_key}), batch {self.batch_size}: "
                 f"{self.trials} trials in {self.wall_s:.1f} s, database {self.db}"
                 + (f", measured through RPC {self.rpc}" if self.rpc else ""),
                 f"ratios: {self.ratio_note}",
                 f"{'task':44s} {'kind':8s} {'x':>3s} {'status':16s} {'trials':>7s} {'best':>11s}"]
        for t in sorted(self.tasks, key=lambda t: (t.kind, t.name)):
            best = "-" if t.best_us is None or not math.isfinite(t.best_us) else f"{t.best_us:.3g} us"
            lines.append(f"{t.name[:44]:44s} {t.kind:8s} {t.weight:3d} {t.status:16s} "
                         f"{t.trials:3d}/{t.trials_total:<3d} {best:>11s}" + (f"  ({t.note})" if t.note else ""))
        n_skip = len(self.skipped)
        if n_skip:
            lines.append(f"{n_skip} task(s) already tuned to budget in the database: skipped")
        return "\n".join(lines)
