"""Error-compensating INT8 weight rounding (METHOD section 5: refinement from calibration data).

Rounding every weight to its nearest INT8 code is optimal per weight but not per layer output:
on MobileNetV2 the first depthwise conv (9 weights per channel, large and of opposite signs after
BatchNorm folding) turns its rounding errors into most of the INT8 model's logit error. Here the
codes are chosen column by column (input channel x kernel tap) and each column's rounding error is
pushed onto the columns not yet rounded, weighted by the calibration inputs' second moments
H = sum x x^T, so that W x rather than W itself is preserved (the optimal-brain-quantization
update, as GPTQ applies it). The scales stay the per-output-channel absmax scales of section 1, so
the codes stay in [-127, 127], bit extraction is unchanged, and kernels cannot tell the difference:
only the stored INT8 codes move.
"""
from __future__ import annotations

import numpy as np

from .int8 import WEIGHT_QMAX
from .layer import LayerSpec

ROUNDINGS = ("nearest", "compensated")
DAMPING = 0.01          # share of the mean diagonal added to H: keeps the inverse well conditioned
GRAM_ROWS_PER_CHUNK = 1 << 16


def _conv_patches(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """(N, C, kh*kw, L) input patches of a conv, in the weight's (c, i, j) order."""
    kh, kw = spec.kernel_size
    pt, pl, pb, pr = spec.padding
    sh, sw = spec.strides
    dh, dw = spec.dilation
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    OH, OW = int(spec.out_shape[-2]), int(spec.out_shape[-1])
    taps = [xp[:, :, i * dh: i * dh + sh * (OH - 1) + 1: sh, j * dw: j * dw + sw * (OW - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    return np.stack(taps, axis=2).reshape(x.shape[0], x.shape[1], kh * kw, OH * OW)


def input_gram(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """sum over positions of p p^T for the layer's input patches p: (groups, K, K) float64 with
    K = channels per group * kernel taps (a dense layer is one group of its C inputs)."""
    x = np.asarray(x, dtype=np.float32)
    if spec.op == "dense":
        rows = x.reshape(-1, x.shape[-1])
        gram = np.zeros((1, rows.shape[1], rows.shape[1]))
        for s in range(0, rows.shape[0], GRAM_ROWS_PER_CHUNK):
            r = rows[s:s + GRAM_ROWS_PER_CHUNK].astype(np.float64)
            gram[0] += r.T @ r
        return gram
    G, Cg = spec.groups, spec.channels_per_group
    kk = spec.kernel_size[0] * spec.kernel_size[1]
    gram = np.zeros((G, Cg * kk, Cg * kk))
    for n in range(x.shape[0]):
        p = _conv_patches(x[n:n + 1], spec)[0].reshape(G, Cg * kk, -1).astype(np.float64)
        gram += p @ p.transpose(0, 2, 1)
    return gram


def compensated_codes(weight: np.ndarray, scale: np.ndarray, gram: np.ndarray, groups: int = 1,
                      damping: float = DAMPING) -> np.ndarray:
    """INT8 codes (weight's shape) that keep `W x` close on inputs whose patch Gram is `gram`.

    weight: (O, Cg, kh, kw) or (O, C); scale: (O,) per-output-channel scales (fixed); gram:
    (groups, K, K) from `input_gram`. Columns are rounded in decreasing order of their input
    energy; input columns that never fire (zero diagonal) are rounded to nearest, uncompensated.
    """
    w = np.asarray(weight, dtype=np.float64)
    O = w.shape[0]
    G = int(groups)
    K = int(np.prod(w.shape[1:]))
    if gram.shape != (G, K, K):
        raise ValueError(f"input Gram of shape {gram.shape} does not match a weight {w.shape} in {G} groups")
    s = np.asarray(scale, dtype=np.float32).astype(np.float64).reshape(G, O // G, 1)
    W = w.reshape(G, O // G, K).copy()
    H = np.array(gram, dtype=np.float64)
    diag = np.diagonal(H, axis1=1, axis2=2).copy()
    dead = diag <= 0
    gi, ki = np.nonzero(dead)
    H[gi, ki, ki] = 1.0          # a PSD Gram's row and column of a zero diagonal are zero already
    mean_diag = np.where(dead, 0.0, diag).sum(1) / np.maximum((~dead).sum(1), 1)
    H += (damping * np.maximum(mean_diag, 1e-12))[:, None, None] * np.eye(K)
    order = np.argsort(-np.where(dead, -1.0, diag), axis=1, kind="stable")          # (G, K)
    H = np.take_along_axis(np.take_along_axis(H, order[:, :, None], 1), order[:, None, :], 2)
    W = np.take_along_axis(W, order[:, None, :], 2)
    # upper Cholesky factor of H^-1: row i holds the update that spreads column i's error forward
    U = np.linalg.cholesky(np.linalg.inv(H)).transpose(0, 2, 1)
    Q = np.empty_like(W)
    for i in range(K):
        q = np.clip(np.rint(W[:, :, i] / s[:, :, 0]), -WEIGHT_QMAX, WEIGHT_QMAX)
        Q[:, :, i] = q
        err = (W[:, :, i] - q * s[:, :, 0]) / U[:, i, i][:, None]
        W[:, :, i:] -= err[:, :, None] * U[:, None, i, i:]
    out = np.empty_like(Q)
    np.put_along_axis(out, order[:, None, :], Q, axis=2)
    return out.reshape(w.shape).astype(np.int8)


def output_error(weight: np.ndarray, scale: np.ndarray, codes: np.ndarray, gram: np.ndarray, groups: int = 1) -> float:
    """sum over calibration positions of |(W - s q) x|^2: the quantity `compensated_codes` lowers."""
    O = weight.shape[0]
    G = int(groups)
    K = gram.shape[-1]
    d = (np.asarray(weight, np.float64) - np.asarray(codes, np.float64)
         * np.asarray(scale, np.float32).astype(np.float64).reshape((-1,) + (1,) * (weight.ndim - 1)))
    d = d.reshape(G, O // G, K)
    return float(np.einsum("gok,gkj,goj->", d, gram, d))


def check_rounding(name: str) -> str:
    if name not in ROUNDINGS:
        raise ValueError(f"unknown weight rounding {name!r}; choose one of {', '.join(ROUNDINGS)}")
    return name
