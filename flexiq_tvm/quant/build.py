"""Builds a Plan from layers and calibration statistics: the FlexiQ quantization pipeline in numpy."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .bitextract import (MAX_SHIFT, SHIFT_RULES, activation_group_shifts, activation_group_shifts_mse, weight_group_shifts,
                         weight_group_shifts_mse)
from .calibrators import TensorStats, check_calibrator, clip_value
from .int8 import activation_qrange, activation_scale, quantize_activation, quantize_weight
from .layer import LayerSpec
from .plan import LayerPlan, Plan, model_fingerprint
from .rounding import check_rounding, compensated_codes
from .ranking import channel_lowering_error, group_ranks, num_groups, order_channels
from .schedule import STANDARD_LEVELS, check_ratio, cumulative_mac_share, level_prefixes, proportional_schedule

GROUP_SIZES = (1, 8, 16, 32, 64)
SEARCHES = ("range", "sensitivity")


def activation_absmax_codes(stats: TensorStats, scale: float, unsigned: bool) -> np.ndarray:
    """Calibrated per-channel magnitude in INT8 codes (saturating at the code range)."""
    hi = activation_qrange(unsigned)[1]
    return np.minimum(np.floor(stats.channel_absmax / np.float32(scale) + 0.5), hi).astype(np.int64)


def plan_layer(spec: LayerSpec, stats: TensorStats, group_size: int, calibrator: str,
               percentile: float = 99.99, shift_rule: str = "mse", rounding: str = "nearest") -> LayerPlan:
    """INT8 scales, value-range order and bit-extraction shifts of one layer."""
    if stats.channel_absmax.shape != (spec.in_channels,):
        raise ValueError(f"layer {spec.name!r}: statistics cover {stats.channel_absmax.shape[0]} channels, "
                         f"layer has {spec.in_channels}")
    q_w, w_scale = quantize_weight(spec.weight)
    stored = None
    if rounding == "compensated":
        if stats.gram is None:
            raise ValueError(f"layer {spec.name!r}: compensated rounding needs input Gram matrices "
                             "(collect_stats(..., grams=True))")
        q_w = stored = compensated_codes(spec.weight, w_scale, stats.gram, spec.groups)
    clip = clip_value(stats, calibrator, spec.act_unsigned, percentile=percentile)
    s_x = activation_scale(clip, spec.act_unsigned)
    codes = activation_absmax_codes(stats, s_x, spec.act_unsigned)
    err = channel_lowering_error(spec, q_w, w_scale, s_x, codes, stats.channel_sqmean)
    order = order_channels(err)
    rank = group_ranks(order, group_size)
    n = num_groups(spec.in_channels, group_size)
    channel_of = spec.weight_input_channel()
    if shift_rule == "uniform":
        w_shift = np.full((spec.out_channels, n), MAX_SHIFT, dtype=np.int32)
    elif shift_rule == "mse":
        w_shift = weight_group_shifts_mse(q_w, channel_of, rank, n)
    else:
        w_shift = weight_group_shifts(q_w, channel_of, rank, n)
    if shift_rule == "uniform":
        a_shift = np.full(n, MAX_SHIFT, dtype=np.int32)
    elif shift_rule == "mse" and stats.channel_sample is not None and stats.channel_sample.size:
        x_codes = quantize_activation(stats.channel_sample, s_x, spec.act_unsigned)
        a_shift = activation_group_shifts_mse(x_codes, rank, n, spec.act_unsigned)
    else:
        a_shift = activation_group_shifts(codes, rank, n, spec.act_unsigned)
    # dynamic extraction keeps the static rule's clipping: live max-rule shift minus this offset
    max_rule = activation_group_shifts(codes, rank, n, spec.act_unsigned)
    offset = np.maximum(max_rule - a_shift, 0) if shift_rule == "mse" else np.zeros(n, np.int32)
    return LayerPlan(name=spec.name, op=spec.op, in_channels=spec.in_channels, out_channels=spec.out_channels,
                     groups=spec.groups, group_size=group_size, order=order, weight_scale=w_scale,
                     act_scale=float(s_x), act_unsigned=spec.act_unsigned,
                     act_shift=a_shift, weight_shift=w_shift, act_dynamic_offset=offset,
                     macs_per_channel=spec.macs_per_channel, weight_codes=stored)


def build_plan(specs: Sequence[LayerSpec], stats: Sequence[TensorStats], *, ratios=STANDARD_LEVELS,
               group_size: int = 16, calibrator: str = "percentile", search: str = "range", seed: int = 0,
               percentile: float = 99.99, shift_rule: str = "mse", rounding: str = "nearest",
               meta: Optional[dict] = None, progress=None) -> Plan:
    """Quantize every layer and order the lowering steps across layers.

    rounding: "nearest" INT8 weights, or "compensated" (quant/rounding.py: codes chosen to keep each
    layer's output on the calibration inputs; needs statistics gathered with grams=True)."""
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (hardware groups: {GROUP_SIZES}), got {group_size!r}")
    check_calibrator(calibrator)
    check_rounding(rounding)
    if search not in SEARCHES:
        raise ValueError(f"search {search!r} is not available; choose one of {SEARCHES}")
    if shift_rule not in SHIFT_RULES:
        raise ValueError(f"shift_rule must be one of {SHIFT_RULES}, got {shift_rule!r}")
    if len(specs) != len(stats):
        raise ValueError(f"{len(specs)} layers but statistics for {len(stats)}")
    if not specs:
        raise ValueError("the model has no quantizable layers (conv2d / dense with constant weights)")
    levels = sorted({check_ratio(r) for r in ratios} | {0.0, 1.0})
    it = zip(specs, stats)
    if progress is not None:
        it = progress(it, total=len(specs), desc="quantize layers")
    layers = [plan_layer(s, st, group_size, calibrator, percentile, shift_rule, rounding) for s, st in it]
    schedule = proportional_schedule([l.n_groups for l in layers])
    share = cumulative_mac_share(schedule, [l.group_macs for l in layers])
    info = {"calibrator": calibrator, "search": search, "seed": int(seed), "percentile": percentile,
            "shift_rule": shift_rule, "rounding": rounding}
    info.update(meta or {})
    return Plan(fingerprint=model_fingerprint(specs), group_size=group_size, layers=layers,
                schedule=schedule, levels=level_prefixes(share, levels), meta=info)
