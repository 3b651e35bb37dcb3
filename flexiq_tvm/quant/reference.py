"""The numpy integer reference executor: the literal FlexiQ mixed dot product (METHOD section 2).

    acc[o] = sum_{c high} q_w[o,c] q_x[c]
           + sum_{g low} (sum_{c in g} q4_w[o,c] q4_x[c]) << (e_w[o,g] + e_x[g])

computed group by group with 4-bit codes and explicit shifts, in int64. Compiled kernels take a
different route (one INT8 reduction over strict-subset operands), so agreement between the two is
a real check, and every target is tested bit-exact against this module.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .bitextract import four_bit_code, shift_for_magnitude
from .int8 import activation_qrange, dequant_scale, quantize_activation, quantize_weight_with_scale
from .layer import LayerSpec
from .plan import LayerPlan, Plan


def conv2d_int(qx: np.ndarray, w: np.ndarray, strides, padding, dilation, groups: int) -> np.ndarray:
    """Exact integer NCHW/OIHW convolution in int64 (im2col by kernel tap, grouped einsum)."""
    qx = np.asarray(qx, dtype=np.int64)
    w = np.asarray(w, dtype=np.int64)
    N, C, H, W = qx.shape
    O, Cg, KH, KW = w.shape
    pt, pl, pb, pr = padding
    sh, sw = strides
    dh, dw = dilation
    xp = np.pad(qx, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    xg = xp.reshape(N, groups, Cg, H + pt + pb, W + pl + pr)
    wg = w.reshape(groups, O // groups, Cg, KH, KW)
    acc = np.zeros((N, groups, O // groups, OH, OW), dtype=np.int64)
    for i in range(KH):
        for j in range(KW):
            tap = xg[:, :, :, i * dh: i * dh + sh * (OH - 1) + 1: sh, j * dw: j * dw + sw * (OW - 1) + 1: sw]
            acc += np.einsum("ngchw,goc->ngohw", tap, wg[:, :, :, i, j])
    return acc.reshape(N, O, OH, OW)


def dense_int(qx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact integer `x @ w.T` over the last axis, in int64."""
    qx = np.asarray(qx, dtype=np.int64)
    return np.einsum("...c,oc->...o", qx, np.asarray(w, dtype=np.int64))


class LayerReference:
    """Integer reference of one FlexiQ layer under a plan, at any 4-bit group count."""

    def __init__(self, spec: LayerSpec, plan: LayerPlan):
        self.spec, self.plan = spec, plan
        self.q_w = quantize_weight_with_scale(spec.weight, plan.weight_scale).astype(np.int64)
        self.rank = plan.rank
        self.channel_of = spec.weight_input_channel()                      # (O, Cg)
        self.scale = dequant_scale(plan.weight_scale, plan.act_scale)
        self.bias = np.asarray(spec.bias, dtype=np.float32)

    def _op(self, qx, w):
        s = self.spec
        if s.op == "conv2d":
            return conv2d_int(qx, w, s.strides, s.padding, s.dilation, s.groups)
        return dense_int(qx, w)

    def _channel_view(self, v, ndim):
        """Broadcast a per-input-channel vector along the activation's channel axis."""
        if self.spec.op == "conv2d":
            return v.reshape((1, -1) + (1,) * (ndim - 2))
        return v.reshape((1,) * (ndim - 1) + (-1,))

    def _out_view(self, v, ndim):
        if self.spec.op == "conv2d":
            return v.reshape((1, -1) + (1,) * (ndim - 2))
        return v.reshape((1,) * (ndim - 1) + (-1,))

    def quantize_input(self, x) -> np.ndarray:
        return quantize_activation(x, np.float32(self.plan.act_scale), self.plan.act_unsigned).astype(np.int64)

    def activation_shifts(self, qx: np.ndarray, dynamic: bool = False) -> np.ndarray:
        """Per-group activation shifts: the plan's static ones, or (dynamic extraction) from the
        live tensor's per-group code magnitude."""
        if not dynamic:
            return self.plan.act_shift
        axes = tuple(i for i in range(qx.ndim) if i != (1 if self.spec.op == "conv2d" else qx.ndim - 1))
        m_c = np.abs(qx).max(axis=axes) if qx.size else np.zeros(self.spec.in_channels, np.int64)
        m = np.zeros(self.plan.n_groups, dtype=np.int64)
        np.maximum.at(m, self.rank, m_c)
        return shift_for_magnitude(m, self.plan.act_unsigned)

    def accumulate(self, x, k: int, dynamic: bool = False) -> np.ndarray:
        """int64 accumulators of the layer with its first `k` lowering groups in 4-bit."""
        qx = self.quantize_input(x)
        return self.accumulate_codes(qx, k, dynamic)

    def accumulate_codes(self, qx, k: int, dynamic: bool = False) -> np.ndarray:
        k = int(k)
        if not 0 <= k <= self.plan.n_groups:
            raise ValueError(f"layer {self.spec.name!r}: count {k} outside 0..{self.plan.n_groups}")
        qx = np.asarray(qx, dtype=np.int64)
        low = self.rank < k
        high_x = qx * self._channel_view(~low, qx.ndim)
        acc = self._op(high_x, self.q_w)
        e_x = self.activation_shifts(qx, dynamic)
        unsigned = self.plan.act_unsigned
        w_rank = self.rank[self.channel_of]                                # (O, Cg)
        for g in range(k):
            in_g = self.rank == g
            x4 = four_bit_code(qx, int(e_x[g]), unsigned) * self._channel_view(in_g, qx.ndim)
            e_w = self.plan.weight_shift[:, g]                             # (O,)
            wmask = (w_rank == g).reshape(w_rank.shape + (1,) * (self.q_w.ndim - 2))
            w4 = four_bit_code(self.q_w, e_w.reshape((-1,) + (1,) * (self.q_w.ndim - 1)), False) * wmask
            part = self._op(x4, w4)
            acc += np.left_shift(part, self._out_view(e_w.astype(np.int64) + int(e_x[g]), part.ndim))
        return acc

    def dequantize(self, acc) -> np.ndarray:
        a = np.asarray(acc).astype(np.float32)
        return a * self._out_view(self.scale, a.ndim) + self._out_view(self.bias, a.ndim)

    def forward(self, x, k: int, dynamic: bool = False) -> np.ndarray:
        return self.dequantize(self.accumulate(x, k, dynamic))


def reference_layers(specs: Sequence[LayerSpec], plan: Plan):
    return [LayerReference(s, p) for s, p in zip(specs, plan.layers)]


def int8_range_check(q, unsigned: bool) -> bool:
    lo, hi = activation_qrange(unsigned)
    q = np.asarray(q)
    return bool(q.min() >= lo and q.max() <= hi)
