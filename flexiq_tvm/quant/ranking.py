"""Value-range ranking of input channels (METHOD section 3), the first proxy for lowering error.

A channel's lowering error is estimated from the step sizes that bit extraction would use on it
(its own activation range and its weights' ranges, at a granularity of one channel), weighted by
how much signal it carries. Channels are sorted by that estimate and cut into hardware groups, so
that groups are homogeneous (METHOD: sorting before grouping is what makes extraction pay off at
group sizes of 16 and more).
"""
from __future__ import annotations

import numpy as np

from .bitextract import shift_for_magnitude
from .layer import LayerSpec


def _rounding_variance(shift: np.ndarray) -> np.ndarray:
    """Variance of rounding an integer to a multiple of 2^e (0 when e == 0)."""
    return (np.power(4.0, shift) - 1.0) / 12.0


def channel_lowering_error(layer: LayerSpec, q_w: np.ndarray, w_scale: np.ndarray, act_scale: float,
                           act_absmax_code: np.ndarray, act_sqmean: np.ndarray) -> np.ndarray:
    """Estimated output squared error of lowering each input channel alone, (C,) float64."""
    C, O = layer.in_channels, layer.out_channels
    chan = layer.weight_input_channel()                                   # (O, Cg)
    qw = q_w.astype(np.float64).reshape(O, layer.channels_per_group, -1)  # (O, Cg, K)
    s2 = (w_scale.astype(np.float64) * float(act_scale)) ** 2             # (O,)
    e_x = shift_for_magnitude(act_absmax_code, layer.act_unsigned)        # (C,)
    e_w = shift_for_magnitude(np.abs(qw).max(axis=2).astype(np.int64), unsigned=False)  # (O, Cg)
    x_code_sq = np.asarray(act_sqmean, np.float64) / float(act_scale) ** 2  # E[q_x^2] per channel
    w_energy = (qw ** 2).sum(axis=2)                                      # (O, Cg)
    k = qw.shape[2]
    contrib = s2[:, None] * (w_energy * _rounding_variance(e_x)[chan]
                             + k * _rounding_variance(e_w) * x_code_sq[chan])
    err = np.zeros(C)
    np.add.at(err, chan.ravel(), contrib.ravel())
    return err


def order_channels(error: np.ndarray) -> np.ndarray:
    """Lowering order: cheapest channel first, ties broken by channel index (stable)."""
    return np.argsort(np.asarray(error, np.float64), kind="stable").astype(np.int32)


def group_ranks(order: np.ndarray, group_size: int) -> np.ndarray:
    """rank[c]: index of the group (in lowering order) that input channel c belongs to."""
    rank = np.empty(len(order), dtype=np.int32)
    rank[np.asarray(order)] = np.arange(len(order), dtype=np.int32) // group_size
    return rank


def num_groups(channels: int, group_size: int) -> int:
    return -(-channels // group_size)
