"""Bit extraction (METHOD section 2): the 4-bit window just below a group's unused top bits.

Every lowered value `v << e` (v a 4-bit code, e in 0..4) is itself an INT8 code: the strict-subset
property that lets the 4-bit operands be derived from the stored INT8 tensors by a rounding shift,
without a second scale or a second copy of the weights.
"""
from __future__ import annotations

import numpy as np

MAX_SHIFT = 4


def four_bit_range(unsigned: bool):
    return (0, 15) if unsigned else (-8, 7)


def bitlen(m) -> np.ndarray:
    """Bits needed for the non-negative integers `m` (0 -> 0), elementwise."""
    m = np.asarray(m, dtype=np.int64)
    out = np.zeros(m.shape, dtype=np.int64)
    v = m.copy()
    while np.any(v > 0):
        nz = v > 0
        out[nz] += 1
        v[nz] >>= 1
    return out


def shift_for_magnitude(m, unsigned: bool) -> np.ndarray:
    """e = max(0, bitlen(m) - magnitude bits of the 4-bit code), capped at MAX_SHIFT."""
    mag_bits = 4 if unsigned else 3
    return np.clip(bitlen(m) - mag_bits, 0, MAX_SHIFT).astype(np.int32)


def rounding_shift(q, e) -> np.ndarray:
    """round(q / 2^e), halves rounded up: (q + 2^(e-1)) >> e with an arithmetic shift."""
    q = np.asarray(q, dtype=np.int64)
    e = np.asarray(e, dtype=np.int64)
    return np.right_shift(q + np.right_shift(np.left_shift(1, e), 1), e)


def four_bit_code(q, e, unsigned: bool) -> np.ndarray:
    lo, hi = four_bit_range(unsigned)
    return np.clip(rounding_shift(q, e), lo, hi)


def lower(q, e, unsigned: bool) -> np.ndarray:
    """The INT8 code that the 4-bit operand stands for: four_bit_code(q, e) << e."""
    return np.left_shift(four_bit_code(q, e, unsigned), np.asarray(e, dtype=np.int64))


def weight_group_shifts(q_w: np.ndarray, channel_of: np.ndarray, group_of_channel: np.ndarray,
                        n_groups: int) -> np.ndarray:
    """Per (output channel, lowering group) weight shifts, int32 (O, n_groups).

    `channel_of` is the (O, C/groups) map from a weight element to its input channel; groups that an
    output channel never reads (grouped convs) get shift 0.
    """
    O = q_w.shape[0]
    per_oc = np.abs(q_w.astype(np.int64)).reshape(O, channel_of.shape[1], -1).max(axis=2)
    m = np.zeros((O, n_groups), dtype=np.int64)
    rows = np.repeat(np.arange(O), channel_of.shape[1])
    np.maximum.at(m, (rows, group_of_channel[channel_of].ravel()), per_oc.ravel())
    return shift_for_magnitude(m, unsigned=False)


def activation_group_shifts(absmax_code: np.ndarray, group_of_channel: np.ndarray, n_groups: int,
                            unsigned: bool) -> np.ndarray:
    """Static per-group activation shifts from calibrated per-channel code magnitudes, int32 (n_groups,)."""
    m = np.zeros(n_groups, dtype=np.int64)
    np.maximum.at(m, group_of_channel, np.asarray(absmax_code, dtype=np.int64))
    return shift_for_magnitude(m, unsigned)


SHIFT_RULES = ("max", "mse", "uniform")   # uniform: keep the top 4 bits (shift 4), no extraction


def _mse_pick(err: np.ndarray) -> np.ndarray:
    """Index of the smallest error along the last axis; ties go to the larger shift (less clipping)."""
    rev = err[..., ::-1]
    return (err.shape[-1] - 1 - np.argmin(rev, axis=-1)).astype(np.int32)


def weight_group_shifts_mse(q_w: np.ndarray, channel_of: np.ndarray, group_of_channel: np.ndarray,
                            n_groups: int) -> np.ndarray:
    """Per (output channel, group) weight shifts minimising the squared lowering error.

    The max rule never clips but rounds everything with the step its largest value needs; a
    smaller shift clips a few large codes and halves the step of all others. Both keep the strict
    subset, so the kernels cannot tell them apart: this is a choice of ours (the paper states the
    max rule), measured on the demo model in the README.
    """
    O = q_w.shape[0]
    q = q_w.astype(np.int64).reshape(O, channel_of.shape[1], -1)
    gid = group_of_channel[channel_of]                                    # (O, Cg)
    rows = np.repeat(np.arange(O), channel_of.shape[1])
    err = np.zeros((O, n_groups, MAX_SHIFT + 1))
    for e in range(MAX_SHIFT + 1):
        per_oc = ((lower(q, e, False) - q) ** 2).sum(axis=2)             # (O, Cg)
        np.add.at(err[:, :, e], (rows, gid.ravel()), per_oc.ravel())
    return _mse_pick(err)


def activation_group_shifts_mse(codes_by_channel: np.ndarray, group_of_channel: np.ndarray, n_groups: int,
                                unsigned: bool) -> np.ndarray:
    """Per-group activation shifts minimising the squared lowering error of calibration codes.

    `codes_by_channel` is (C, S): S calibration samples of each channel's INT8 codes.
    """
    q = np.asarray(codes_by_channel, dtype=np.int64)
    err = np.zeros((n_groups, MAX_SHIFT + 1))
    for e in range(MAX_SHIFT + 1):
        per_c = ((lower(q, e, unsigned) - q) ** 2).sum(axis=1)
        np.add.at(err[:, e], group_of_channel, per_c)
    return _mse_pick(err)
