"""Activation clipping values from calibration statistics (max, percentile, MSE-optimal).

Statistics arrive as a `TensorStats` gathered by `flexiq_tvm.calibrate`: exact per-channel ranges
plus a seeded subsample of values, enough for a percentile or an MSE search without keeping every
activation of the calibration set in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .int8 import activation_qrange

CALIBRATORS = ("max", "percentile", "mse")


@dataclass
class TensorStats:
    """Calibration statistics of one layer's input tensor (channel axis given by the layer)."""

    channel_absmax: np.ndarray      # (C,) max |x| per input channel
    channel_sqmean: np.ndarray      # (C,) mean x^2 per input channel
    minimum: float
    maximum: float
    sample: np.ndarray              # 1-D float32 subsample of the values
    count: int = 0                  # number of samples (images) seen
    channel_sample: Optional[np.ndarray] = None   # (C, S) values of each channel at S positions
    gram: Optional[np.ndarray] = None             # (groups, K, K) input-patch second moments (rounding.input_gram)

    @property
    def absmax(self) -> float:
        return float(max(abs(self.minimum), abs(self.maximum)))


def clip_value(stats: TensorStats, calibrator: str, unsigned: bool, percentile: float = 99.99,
               mse_grid: int = 64) -> float:
    """The |x| beyond which activations saturate."""
    if calibrator == "max":
        return stats.maximum if unsigned else stats.absmax
    values = np.abs(stats.sample.astype(np.float64)) if not unsigned else np.maximum(stats.sample, 0).astype(np.float64)
    if values.size == 0:
        return stats.absmax
    if calibrator == "percentile":
        return float(min(np.percentile(values, percentile), stats.absmax)) or stats.absmax
    if calibrator == "mse":
        return _mse_clip(stats.sample.astype(np.float64), stats.absmax, unsigned, mse_grid)
    raise ValueError(f"unknown calibrator {calibrator!r}; choose one of {CALIBRATORS}")


def _mse_clip(sample: np.ndarray, absmax: float, unsigned: bool, grid: int) -> float:
    if absmax <= 0:
        return 0.0
    lo, hi = activation_qrange(unsigned)
    best, best_err = absmax, np.inf
    for frac in np.linspace(0.2, 1.0, grid):
        clip = absmax * frac
        s = clip / hi
        q = np.clip(np.floor(sample / s + 0.5), lo, hi)
        err = float(np.mean((q * s - sample) ** 2))
        if err < best_err:
            best, best_err = clip, err
    return float(best)


def check_calibrator(name: Optional[str]) -> str:
    if name not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {name!r}; choose one of {', '.join(CALIBRATORS)}")
    return name
