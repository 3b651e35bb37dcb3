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
from .int8 import dequant_scale, quantize_activation
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

    def __init__(self, spec: LayerSpec, plan: LayerPlan, dynamic: bool = False):
        self.spec, self.plan = spec, plan
        self.dynamic = bool(dynamic)   # default of the `dynamic` arguments below (Plan.dynamic)
        self.q_w = plan.int8_weight(spec.weight).astype(np.int64)
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

    def _sample_view(self, v, ndim):
        """Broadcast a per-sample vector (N,) along all the other axes."""
        return np.asarray(v).reshape((-1,) + (1,) * (ndim - 1))

    def activation_shifts(self, qx: np.ndarray, dynamic: Optional[bool] = None) -> np.ndarray:
        """Per-group activation shifts.

        Static: the plan's calibrated ones, shape (n_groups,).
        Dynamic extraction: from the live codes, per SAMPLE (axis 0) and group, shape
        (N, n_groups): ``m[n, g] = max |qx|`` over the group's channels and every other position
        of sample n (spatial positions for conv, tokens for dense), ``e = shift_for_magnitude(m)``.
        A sample's shifts never depend on the other samples of the batch.
        """
        dynamic = self.dynamic if dynamic is None else bool(dynamic)
        if not dynamic:
            return self.plan.act_shift
        qx = np.asarray(qx, dtype=np.int64)
        C = self.spec.in_channels
        ch = 1 if self.spec.op == "conv2d" else qx.ndim - 1
        N = qx.shape[0]
        a = np.moveaxis(np.abs(qx), ch, -1).reshape(N, -1, C)
        m_c = a.max(axis=1) if a.shape[1] else np.zeros((N, C), np.int64)      # (N, C)
        m = np.zeros((N, self.plan.n_groups), dtype=np.int64)
        for g in range(self.plan.n_groups):
            in_g = self.rank == g
            if in_g.any():
                m[:, g] = m_c[:, in_g].max(axis=1)
        offset = np.asarray(self.plan.act_dynamic_offset, dtype=np.int64)[None, :]
        return np.maximum(shift_for_magnitude(m, self.plan.act_unsigned) - offset, 0).astype(np.int32)

    def accumulate(self, x, k: int, dynamic: Optional[bool] = None) -> np.ndarray:
        """int64 accumulators of the layer with its first `k` lowering groups in 4-bit."""
        qx = self.quantize_input(x)
        return self.accumulate_codes(qx, k, dynamic)

    def accumulate_codes(self, qx, k: int, dynamic: Optional[bool] = None) -> np.ndarray:
        k = int(k)
        if not 0 <= k <= self.plan.n_groups:
            raise ValueError(f"layer {self.spec.name!r}: count {k} outside 0..{self.plan.n_groups}")
        qx = np.asarray(qx, dtype=np.int64)
        low = self.rank < k
        high_x = qx * self._channel_view(~low, qx.ndim)
        acc = self._op(high_x, self.q_w)
        e_x = np.asarray(self.activation_shifts(qx, dynamic), dtype=np.int64)
        per_sample = e_x.ndim == 2                                         # dynamic: (N, n_groups)
        unsigned = self.plan.act_unsigned
        w_rank = self.rank[self.channel_of]                                # (O, Cg)
        for g in range(k):
            in_g = self.rank == g
            ex_in = self._sample_view(e_x[:, g], qx.ndim) if per_sample else int(e_x[g])
            x4 = four_bit_code(qx, ex_in, unsigned) * self._channel_view(in_g, qx.ndim)
            e_w = self.plan.weight_shift[:, g]                             # (O,)
            wmask = (w_rank == g).reshape(w_rank.shape + (1,) * (self.q_w.ndim - 2))
            w4 = four_bit_code(self.q_w, e_w.reshape((-1,) + (1,) * (self.q_w.ndim - 1)), False) * wmask
            part = self._op(x4, w4)
            ex_out = self._sample_view(e_x[:, g], part.ndim) if per_sample else int(e_x[g])
            acc += np.left_shift(part, self._out_view(e_w.astype(np.int64), part.ndim) + ex_out)
        return acc

    def dequantize(self, acc) -> np.ndarray:
        a = np.asarray(acc).astype(np.float32)
        return a * self._out_view(self.scale, a.ndim) + self._out_view(self.bias, a.ndim)

    def forward(self, x, k: int, dynamic: Optional[bool] = None) -> np.ndarray:
        return self.dequantize(self.accumulate(x, k, dynamic))


def reference_layers(specs: Sequence[LayerSpec], plan: Plan):
    dynamic = bool(getattr(plan, "dynamic", False))
    return [LayerReference(s, p, dynamic=dynamic) for s, p in zip(specs, plan.layers)]
