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


# ---------------------------------------------------------------------------------------------
# greedy: re-measured after every step
# ---------------------------------------------------------------------------------------------
def _chunk(macs: np.ndarray, start: int, min_macs: float) -> int:
    """Groups of one layer from `start` whose MACs first reach `min_macs` (at least one group)."""
    acc, j = 0.0, start
    while j < len(macs):
        acc += float(macs[j])
        j += 1
        if acc >= min_macs:
            break
    return j - start


def greedy_schedule(group_macs: Sequence[np.ndarray], evaluate: Callable[[np.ndarray], float],
                    progress=None, step_share: float = 0.0) -> List[int]:
    """Lower, one step at a time, the next groups (in their layer's range order) whose lowering adds
    the least output error per MAC, measured at the model output after every step.

    A step is one group, or with `step_share` > 0 the run of next groups of a layer that reaches
    that share of the model's MACs: on MobileNetV2 (1,068 groups of 16) one group per step costs
    thousands of model evaluations; 1 % steps cost about a hundred rounds.

    Lazy evaluation: a candidate's last measured cost is a bound used to skip re-measuring layers
    that cannot win this step (errors grow as more is lowered, so stale costs are optimistic only
    in unusual cases; the winner is always re-measured against the current state).
    """
    L = len(group_macs)
    counts = np.zeros(L, dtype=np.int32)
    n = [len(g) for g in group_macs]
    min_macs = float(step_share) * float(sum(float(np.sum(g)) for g in group_macs))
    current = float(evaluate(counts))
    stale = {}
    schedule: List[int] = []
    total = sum(n)
    bar = progress(total) if progress is not None else None
    while len(schedule) < total:
        order = sorted((l for l in range(L) if counts[l] < n[l]), key=lambda l: (stale.get(l, -np.inf), l))
        best = None
        for l in order:
            if best is not None and l in stale and stale[l] >= best[0]:
                continue
            step = _chunk(group_macs[l], int(counts[l]), min_macs)
            c = counts.copy()
            c[l] += step
            err = float(evaluate(c))
            moved = float(np.sum(group_macs[l][counts[l]:counts[l] + step]))
            cost = max(err - current, 0.0) / max(moved, 1.0)
            stale[l] = cost
            if best is None or (cost, l) < (best[0], best[1]):
                best = (cost, l, err, step)
        _, l, err, step = best
        counts[l] += step
        schedule.extend([l] * step)
        current = err
        stale.pop(l, None)
        if bar is not None:
            bar.update(step)
    if bar is not None:
        bar.close()
    return schedule


# ---------------------------------------------------------------------------------------------
# evolutionary: per-level group sets, progressively nested
# ---------------------------------------------------------------------------------------------
def sets_from_schedule(schedule: Sequence[int], prefix: int, num_layers: int) -> List[frozenset]:
    """Low group sets (ids in the plan's order) after `prefix` steps of a schedule."""
    c = np.bincount(np.asarray(schedule[:prefix], dtype=np.int64), minlength=num_layers)
    return [frozenset(range(int(k))) for k in c[:num_layers]]


def _share(sets, group_macs, total) -> float:
    return sum(float(group_macs[l][list(s)].sum()) for l, s in enumerate(sets) if s) / total


class _Evolver:
    def __init__(self, group_macs, evaluate, rng, population, generations, mutation_rate, elite, patience,
                 progress):
        self.macs = [np.asarray(g, dtype=np.float64) for g in group_macs]
        self.total = float(sum(g.sum() for g in self.macs))
        self.L = len(group_macs)
        self.evaluate = evaluate
        self.rng = rng
        self.population, self.generations = population, generations
        self.mutation_rate, self.elite, self.patience = mutation_rate, elite, patience
        self.progress = progress
        self.cache = {}

    def fitness(self, sets) -> float:
        key = tuple(tuple(sorted(s)) for s in sets)
        if key not in self.cache:
            self.cache[key] = float(self.evaluate(sets))
        return self.cache[key]

    def share(self, sets) -> float:
        return _share(sets, self.macs, self.total)

    def repair(self, sets, frozen, target, tol):
        """Adds or removes non-frozen groups (lowest ids first when adding: the range order) until
        the 4-bit MAC share lies in [target - tol[0], target + tol[1]]. The lower margin is small
        so that a candidate cannot buy accuracy by computing less in 4-bit than asked."""
        lo_tol, hi_tol = tol
        sets = [set(s) | set(f) for s, f in zip(sets, frozen)]
        for _ in range(10000):
            sh = self.share(sets)
            if sh < target - lo_tol:
                # the next group (range order) of the layer that lands closest to the target
                opts = []
                for l in range(self.L):
                    rest = set(range(len(self.macs[l]))) - sets[l]
                    if rest:
                        g = min(rest)
                        opts.append((abs(sh + self.macs[l][g] / self.total - target), self.rng.random(), l, g))
                if not opts:
                    break
                _, _, l, g = min(opts)
                sets[l].add(g)
            elif sh > target + hi_tol:
                opts = []
                for l in range(self.L):
                    free = sets[l] - set(frozen[l])
                    if free:
                        g = max(free)
                        after = sh - self.macs[l][g] / self.total
                        if after >= target - lo_tol:
                            opts.append((abs(after - target), self.rng.random(), l, g))
                if not opts:
                    break
                _, _, l, g = min(opts)
                sets[l].remove(g)
            else:
                break
        return [frozenset(s) for s in sets]

    def mutate(self, sets, frozen):
        """Swaps a 4-bit and an 8-bit group inside one layer (MAC share unchanged)."""
        sets = [set(s) for s in sets]
        cand = [l for l in range(self.L) if (sets[l] - set(frozen[l])) and len(sets[l]) < len(self.macs[l])]
        if not cand:
            return [frozenset(s) for s in sets]
        l = cand[self.rng.integers(len(cand))]
        low = sorted(sets[l] - set(frozen[l]))
        high = sorted(set(range(len(self.macs[l]))) - sets[l])
        a = low[self.rng.integers(len(low))]
        same = [g for g in high if self.macs[l][g] == self.macs[l][a]] or high
        b = same[self.rng.integers(len(same))]
        sets[l].remove(a)
        sets[l].add(b)
        return [frozenset(s) for s in sets]

    def crossover(self, a, b, frozen, target, tol):
        """Each layer's set from one parent: moves 4-bit budget between layers; then repaired to
        hold the model's 4-bit MAC share."""
        pick = self.rng.integers(0, 2, self.L)
        child = [a[l] if pick[l] == 0 else b[l] for l in range(self.L)]
        return self.repair(child, frozen, target, tol)

    def solve(self, seeds, frozen, target, tol):
        pop = []
        for s in seeds:
            pop.append(self.repair(s, frozen, target, tol))
        while len(pop) < self.population:
            base = pop[self.rng.integers(len(seeds))]
            for _ in range(1 + int(self.rng.integers(3))):
                base = self.mutate(base, frozen)
            pop.append(base)
        scored = sorted(((self.fitness(p), i, p) for i, p in enumerate(pop)), key=lambda t: (t[0], t[1]))
        best, stall = scored[0][0], 0
        it = range(self.generations)
        if self.progress is not None:
            it = self.progress(it)
        for _gen in it:
            parents = [p for _, _, p in scored]
            nxt = [p for _, _, p in scored[: self.elite]]
            while len(nxt) < self.population:
                i, j = self.rng.integers(len(parents), size=2)
                pa = parents[min(i, j)]                      # tournament of two (sorted population)
                i, j = self.rng.integers(len(parents), size=2)
                pb = parents[min(i, j)]
                child = self.crossover(pa, pb, frozen, target, tol)
                if self.rng.random() < self.mutation_rate:
                    child = self.mutate(child, frozen)
                nxt.append(child)
            scored = sorted(((self.fitness(p), i, p) for i, p in enumerate(nxt)), key=lambda t: (t[0], t[1]))
            if scored[0][0] < best - 1e-12:
                best, stall = scored[0][0], 0
            else:
                stall += 1
                if stall >= self.patience:
                    break
        return scored[0][2], scored[0][0]


def evolutionary_levels(group_macs: Sequence[np.ndarray], evaluate: Callable[[list], float],
                        levels: Sequence[float], seed_schedules: Sequence[Sequence[int]], seed: int = 0,
                        population: int = 16, generations: int = 20, mutation_rate: float = 0.5, elite: int = 2,
                        patience: int = 5, progress=None) -> List[List[frozenset]]:
    """Nested per-level 4-bit group sets: level i is searched with level i-1's sets frozen.

    The initial population of each level holds the seed schedules' prefixes at that level (range
    ranking, greedy / sensitivity) plus mutations of them. Returns one list of per-layer sets per
    level, in ascending level order; level 1.0 (if present) is every group.
    """
    rng = np.random.default_rng(seed)
    ev = _Evolver(group_macs, evaluate, rng, population, generations, mutation_rate, elite, patience, progress)
    L = len(group_macs)
    # the MAC share may miss the level by half a typical group either way (levels are reached at
    # group granularity), never by more: a candidate cannot buy accuracy with less 4-bit work
    half = 0.5 * float(np.median([float(v) for g in ev.macs for v in g])) / ev.total
    tol = (half, half)
    frozen = [frozenset() for _ in range(L)]
    out = []
    for r in sorted(float(v) for v in levels):
        if r <= 0.0:
            sets = [frozenset() for _ in range(L)]
        elif r >= 1.0:
            sets = [frozenset(range(len(g))) for g in ev.macs]
        else:
            seeds = []
            for sch in seed_schedules:
                share = np.concatenate([[0.0], np.cumsum([ev.macs[l][k] for l, k in _steps(sch, L)])]) / ev.total
                p = int(np.argmin(np.abs(share - r)))
                seeds.append(sets_from_schedule(sch, p, L))
            sets, _ = ev.solve(seeds, frozen, r, tol)
        out.append(sets)
        frozen = sets
    return out


def _steps(schedule, L):
    nxt = [0] * L
    for l in schedule:
        yield l, nxt[l]
        nxt[l] += 1


def schedule_from_levels(level_sets: Sequence[Sequence[frozenset]], n_groups: Sequence[int]):
    """(per-layer group permutations, global schedule, prefix of each level) realising nested sets.

    Each layer's groups are reordered so that those lowered at lower levels come first (ties in
    the plan's order); between two levels, the new steps are interleaved in proportion.
    """
    L = len(n_groups)
    full = [frozenset(range(n)) for n in n_groups]
    chain = list(level_sets) + ([full] if list(level_sets[-1]) != full else [])
    perms = [[] for _ in range(L)]
    schedule: List[int] = []
    prefixes = []
    prev = [frozenset() for _ in range(L)]
    for sets in chain:
        new = [sorted(set(sets[l]) - set(prev[l])) for l in range(L)]
        for l in range(L):
            if not set(prev[l]) <= set(sets[l]):
                raise ValueError("level sets are not nested")
            perms[l].extend(new[l])
        keyed = sorted(((j + 1) / len(new[l]), l) for l in range(L) for j in range(len(new[l])))
        schedule.extend(l for _, l in keyed)
        prefixes.append(len(schedule))
        prev = sets
    return perms, schedule, prefixes[: len(level_sets)]
