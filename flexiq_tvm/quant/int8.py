"""INT8 base quantization (METHOD section 1): weights per output channel, activations per tensor.

The activation rounding is spelled out in float32 (true division, then floor(v + 0.5)) because
every compiled kernel must reproduce it bit for bit; numpy's round-half-even is not used there.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

WEIGHT_QMAX = 127


def activation_qrange(unsigned: bool) -> Tuple[int, int]:
    """INT8 code range of an activation: [0, 255] after ReLU (zero point 0), else symmetric."""
    return (0, 255) if unsigned else (-127, 127)


def quantize_weight(weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8: returns (q_w int8, s_w float32 (O,))."""
    w = np.asarray(weight, dtype=np.float32)
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(absmax > 0, absmax / WEIGHT_QMAX, 1.0).astype(np.float32)
    return quantize_weight_with_scale(w, scale), scale


def quantize_weight_with_scale(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Re-derives the INT8 weights from a plan's stored scales (deterministic, float64 divide)."""
    w = np.asarray(weight, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float32).astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.clip(np.rint(w / s), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)


def activation_scale(clip_value: float, unsigned: bool) -> np.float32:
    qmax = activation_qrange(unsigned)[1]
    clip_value = float(clip_value)
    if not np.isfinite(clip_value):
        raise ValueError(f"activation clipping value must be finite, got {clip_value}")
    return np.float32(clip_value / qmax) if clip_value > 0 else np.float32(1.0)


def quantize_activation(x: np.ndarray, scale: np.float32, unsigned: bool) -> np.ndarray:
    """float32 -> int32 codes, exactly as the kernels compute them."""
    lo, hi = activation_qrange(unsigned)
    v = np.floor(np.asarray(x, dtype=np.float32) / np.float32(scale) + np.float32(0.5))
    return np.clip(v, lo, hi).astype(np.int32)


def dequant_scale(weight_scale: np.ndarray, act_scale: np.float32) -> np.ndarray:
    """Per-output-channel float32 multiplier of the int32 accumulator."""
    return (np.asarray(weight_scale, np.float64) * np.float64(np.float32(act_scale))).astype(np.float32)
