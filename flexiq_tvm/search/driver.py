"""Runs the channel-selection searches of `quant/search.py` against the compiled model.

The searches themselves are numpy and only see a scoring callback; this module supplies it (one
search build, `fitness.OutputDistance`) and writes the result back into the plan.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from ..quant.plan import Plan
from ..quant.schedule import cumulative_mac_share, level_prefixes
from ..quant.search import (evolutionary_levels, greedy_schedule, measure_curves, schedule_from_levels,
                           sensitivity_schedule)

SEARCHES = ("range", "sensitivity", "greedy", "evolutionary")
# above this many groups in all, the evolutionary search is seeded with the sensitivity ordering
# instead of the greedy one (greedy costs at least one model evaluation per group)
GREEDY_SEED_MAX_GROUPS = 256
# above that size greedy lowers runs of groups worth this share of the MACs per step (see greedy_schedule)
GREEDY_LARGE_STEP_SHARE = 0.01


# model MACs one candidate evaluation may cost (samples x MACs per sample), for the default sample count
SEARCH_MACS_PER_EVALUATION = 5e9
MIN_SEARCH_SAMPLES, MAX_SEARCH_SAMPLES = 16, 512


def default_search_samples(specs) -> int:
    """Deterministic in the model (a timing-based rule would make plans machine-dependent)."""
    macs = sum(s.macs for s in specs) or 1
    return int(np.clip(SEARCH_MACS_PER_EVALUATION // macs, MIN_SEARCH_SAMPLES, MAX_SEARCH_SAMPLES))


def _many_groups(plan: Plan) -> bool:
    """Above GREEDY_SEED_MAX_GROUPS one model evaluation per group gets expensive."""
    return sum(l.n_groups for l in plan.layers) > GREEDY_SEED_MAX_GROUPS


def greedy_step_share(plan: Plan) -> float:
    return GREEDY_LARGE_STEP_SHARE if _many_groups(plan) else 0.0


def _set_schedule(plan: Plan, schedule):
    plan.schedule = [int(v) for v in schedule]
    plan._share = None
    plan.levels = level_prefixes(cumulative_mac_share(plan.schedule, [l.group_macs for l in plan.layers]),
                                 sorted(plan.levels))


def run_search(model, plan: Plan, inputs: np.ndarray, search: str, seed: int = 0, samples: int = 512,
               metric: str = "kl", curve_points: int = 8, population: int = 16, generations: int = 20,
               patience: int = 5, progress: bool = True, target: str = "llvm") -> Plan:
    """Replaces the plan's proportional (range) schedule with the chosen search's result, in place."""
    from .fitness import OutputDistance

    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(inputs.shape[0], size=min(samples, inputs.shape[0]), replace=False))
    fit = OutputDistance(model, plan, inputs[pick], target=target, metric=metric)
    macs = [l.group_macs for l in plan.layers]
    bar = (lambda desc: (lambda it: tqdm(it, desc=desc, disable=not progress, leave=False)))
    if search == "sensitivity":
        curves = measure_curves([l.n_groups for l in plan.layers], fit, max_points=curve_points,
                                progress=bar("sensitivity"))
        _set_schedule(plan, sensitivity_schedule(curves, macs))
        full = [float(c[-1]) for c in curves]
    else:
        full = [fit(np.eye(plan.num_layers, dtype=np.int32)[l] * plan.layers[l].n_groups)
                for l in range(plan.num_layers)]
    plan.meta["layer_error_at_full_4bit"] = {l.name: e for l, e in zip(plan.layers, full)}
    if search in ("range", "sensitivity"):
        pass
    elif search == "greedy":
        step_share = greedy_step_share(plan)
        _set_schedule(plan, greedy_schedule(macs, fit, progress=lambda n: tqdm(total=n, desc="greedy",
                                                                                 disable=not progress, leave=False),
                                            step_share=step_share))
        plan.meta["greedy_step_share"] = step_share
    else:
        range_schedule = list(plan.schedule)
        if not _many_groups(plan):
            greedy = greedy_schedule(macs, fit, progress=lambda n: tqdm(total=n, desc="greedy seed",
                                                                         disable=not progress, leave=False))
            plan.meta["search_seed"] = "range+greedy"
        else:
            curves = measure_curves([l.n_groups for l in plan.layers], fit, max_points=curve_points,
                                    progress=bar("sensitivity seed"))
            greedy = sensitivity_schedule(curves, macs)
            plan.meta["search_seed"] = "range+sensitivity"
        levels = sorted(plan.levels)
        sets = evolutionary_levels(macs, fit.low_sets, levels, [range_schedule, greedy], seed=seed,
                                   population=population, generations=generations, patience=patience,
                                   progress=bar("evolve"))
        perms, schedule, prefixes = schedule_from_levels(sets, [l.n_groups for l in plan.layers])
        plan.layers = [l.reorder_groups(p) for l, p in zip(plan.layers, perms)]
        plan.schedule = schedule
        plan._share = None
        plan.levels = {float(r): int(p) for r, p in zip(levels, prefixes)}
        plan.meta["search_population"] = population
        plan.meta["search_generations"] = generations
    plan.meta["search"] = search
    plan.meta["search_metric"] = metric
    plan.meta["search_samples"] = int(pick.size)
    plan.meta["search_evaluations"] = fit.evaluations
    plan.timings["search"] = round(time.perf_counter() - t0, 2)
    return plan
