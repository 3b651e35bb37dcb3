"""A torch model of the FlexiQ integer scheme: the quantized network, differentiable.

Each FlexiQ layer is computed as the compiled kernels compute it (METHOD section 2, strict subset):

    q_x  = clamp(floor(x / s_x + 0.5), lo, hi)                      # INT8 activation codes
    x_k  = q_x, or lower(q_x, e_x[g]) on the first k groups          # 4-bit operand << shift
    q_w  = clamp(round(v), -127, 127)                                # INT8 weight codes (v: latent)
    w_k  = q_w, or lower(q_w, e_w[o, g]) on the first k groups
    y    = conv / dense(x_k, w_k) * (s_w[o] * s_x) + bias[o] - bias_correction[level][o]

with lower(q, e) = clamp(floor(q / 2^e + 0.5), 4-bit range) * 2^e (the reference's rounding
shift). One reduction over strict-subset operands equals the per-group shifted partial sums of the
reference exactly (integers), which `check_against_reference` verifies layer by layer in float64.
Rounding, clamping and the lowering use straight-through gradients (the forward value is the
integer one; the backward pass treats round/floor as identity, clamps as clamps). The shift tables,
channel orders and levels are the plan's and never change: training moves values only.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ...quant.bitextract import MAX_SHIFT, four_bit_range
from ...quant.int8 import WEIGHT_QMAX, activation_qrange, dequant_scale
from ...quant.plan import Plan
from .graph import RelaxTorchGraph


def _t():
    import torch

    return torch


def round_ste(x):
    return x + (x.round() - x).detach()


def floor_half_ste(x):
    """floor(x + 0.5) forward, identity backward."""
    return x + ((x + 0.5).floor() - x).detach()


def lower_ste(q, scale_pow, lo: int, hi: int):
    """clamp(floor(q / 2^e + 0.5), lo, hi) * 2^e with straight-through rounding; scale_pow = 2^e."""
    return floor_half_ste(q / scale_pow).clamp(lo, hi) * scale_pow


# AdaRound's rectified sigmoid: h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1), which reaches
# exactly 0 and 1 (so the regulariser can settle every weight on one side) and is 0.5 at V = 0.
ZETA, GAMMA = 1.1, -0.1


def rect_sigmoid(v):
    return (_t().sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def rect_sigmoid_inverse(h):
    """V with rect_sigmoid(V) = h, for h in (0, 1)."""
    torch = _t()
    h = h.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def _bitlen(m):
    torch = _t()
    out = torch.zeros_like(m)
    for b in range(9):
        out = out + (m >= (1 << b)).to(m.dtype)
    return out


class QuantLayer:
    """One FlexiQ layer under a plan, with trainable latent codes / scales / per-level bias."""

    def __init__(self, spec, lplan, levels: Sequence[float], dynamic: bool, bias_correction: Dict[float, np.ndarray],
                 dtype=None):
        torch = _t()
        self.spec, self.lplan, self.dynamic = spec, lplan, bool(dynamic)
        self.dtype = dtype or torch.float32
        self.levels = [float(r) for r in levels]
        q_w = lplan.int8_weight(spec.weight).astype(np.float32)
        self.latent = torch.tensor(q_w, dtype=torch.float32, requires_grad=True)
        self.log_wscale = torch.tensor(np.log(np.asarray(lplan.weight_scale, np.float64)), dtype=torch.float32,
                                       requires_grad=True)
        self.w_scale0 = np.asarray(lplan.weight_scale, np.float32).copy()
        self.log_wscale0 = self.log_wscale.detach().clone()
        self.log_ascale = torch.tensor(float(np.log(lplan.act_scale)), dtype=torch.float32, requires_grad=True)
        self.bias = torch.tensor(np.asarray(spec.bias, np.float32))
        # per-level bias deltas (the plan's bias_correction convention: subtracted from the bias)
        self.bias_delta = {r: torch.tensor(np.asarray(bias_correction.get(r, np.zeros(spec.out_channels)), np.float32),
                                           requires_grad=True) for r in self.levels}
        rank = lplan.rank
        self.rank = torch.tensor(rank, dtype=torch.int64)
        self.unsigned = bool(lplan.act_unsigned)
        self.a_lo, self.a_hi = activation_qrange(self.unsigned)
        self.x4_lo, self.x4_hi = four_bit_range(self.unsigned)
        channel_of = spec.weight_input_channel()                               # (O, Cg)
        self.w_rank = torch.tensor(rank[channel_of], dtype=torch.int64)        # (O, Cg)
        ew = np.take_along_axis(lplan.weight_shift, rank[channel_of], axis=1)  # (O, Cg)
        self.w_pow = torch.tensor(2.0 ** ew, dtype=torch.float32)
        self.x_pow = torch.tensor(2.0 ** lplan.act_shift[rank], dtype=torch.float32)          # (C,)
        self.offset = torch.tensor(np.asarray(lplan.act_dynamic_offset, np.int64), dtype=torch.float32)
        self.n_groups = lplan.n_groups
        self.conv = spec.op == "conv2d"
        self.train_wscale = False
        self.train_ascale = False
        self.round_v = None      # learned 4-bit rounding (enable_learned_rounding), else None

    # ---- learned rounding ------------------------------------------------------------------
    def enable_learned_rounding(self):
        """Trains which way each weight's 4-bit code rounds (AdaRound), and derives the INT8 code from it.

        The one stored INT8 code q must stand for both precisions: its 4-bit code is
        clamp(floor(q / 2^e + 0.5), -8, 7), so choosing the 4-bit code q4 confines q to that code's
        bucket [q4 2^e - 2^e/2, q4 2^e + 2^e/2 - 1] (unbounded at -8 and 7). The INT8 code is the
        plan's code clamped into the chosen bucket: unchanged while the 4-bit code keeps its
        rounding, moved to the bucket's edge when it flips. Plain straight-through steps on the INT8
        code (the "ste" rounding) move a code by a fraction of a unit per step, while flipping a
        4-bit code needs up to 2^(e-1) = 8 units; here the flip is one variable per weight, trained
        soft and settled on 0 / 1 by AdaRound's annealed regulariser."""
        torch = _t()
        q0 = self.latent.detach().round().clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
        pw = self.w_pow.reshape(self.w_pow.shape + (1,) * (q0.ndim - 2)).expand_as(q0).contiguous()
        soft = q0 / pw
        self.round_q0, self.round_pw = q0, pw
        self.round_base = torch.floor(soft)
        self.round_half_lo = torch.floor(pw / 2)            # bucket: [q4 pw - half_lo, q4 pw + half_hi]
        self.round_half_hi = torch.ceil(pw / 2) - 1
        self.round_v = rect_sigmoid_inverse(soft - self.round_base).requires_grad_(True)
        self.round_up0 = self.round_v.detach() >= 0

    def flipped_share(self) -> float:
        """Share of the weights whose 4-bit code rounds the other way than the plan's."""
        return float(((self.round_v.detach() >= 0) != self.round_up0).float().mean())

    def round_h(self, soft: bool = True):
        if soft:
            return rect_sigmoid(self.round_v)
        return (self.round_v.detach() >= 0).to(self.round_base.dtype)

    def round_regulariser(self, beta: float):
        """AdaRound's push toward 0 / 1: mean of 1 - |2h - 1|^beta."""
        h = rect_sigmoid(self.round_v)
        return (1 - (2 * h - 1).abs().pow(beta)).mean()

    def _learned_codes(self, soft: bool):
        """(4-bit operand value q4 2^e, INT8 code) per weight, soft or settled."""
        torch = _t()
        q4 = (self.round_base + self.round_h(soft)).clamp(-8, 7)
        q4_hard = (self.round_base + self.round_h(False)).clamp(-8, 7)
        pw = self.round_pw
        lo = torch.where(q4_hard <= -8, torch.full_like(pw, -WEIGHT_QMAX), q4 * pw - self.round_half_lo)
        hi = torch.where(q4_hard >= 7, torch.full_like(pw, WEIGHT_QMAX), q4 * pw + self.round_half_hi)
        q8 = torch.maximum(torch.minimum(self.round_q0, hi), lo).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
        if not soft:
            q8 = q8.round()
        return q4 * pw, q8

    # ---- parameters ----------------------------------------------------------------------
    def parameters(self, codes=True, wscale=False, ascale=False, bias=False) -> List:
        out = []
        if codes:
            out.append(self.latent if self.round_v is None else self.round_v)
        if wscale:
            out.append(self.log_wscale)
        if ascale:
            out.append(self.log_ascale)
        if bias:
            out.extend(self.bias_delta.values())
        return out

    def codes(self) -> np.ndarray:
        """The INT8 codes the latent weights round to."""
        if self.round_v is not None:
            with _t().no_grad():
                return self._learned_codes(soft=False)[1].numpy().astype(np.int8)
        return np.clip(np.rint(self.latent.detach().numpy()), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)

    def weight_scale(self) -> np.ndarray:
        if not self.train_wscale or bool((self.log_wscale.detach() == self.log_wscale0).all()):
            return self.w_scale0      # untouched: the plan's own float32 scales, bit for bit
        return np.exp(self.log_wscale.detach().numpy().astype(np.float64)).astype(np.float32)

    def act_scale(self) -> float:
        if not self.train_ascale:
            return float(self.lplan.act_scale)
        return float(np.float32(np.exp(float(self.log_ascale.detach()))))

    # ---- forward -------------------------------------------------------------------------
    def _chan(self, v, ndim):
        return v.reshape((1, -1) + (1,) * (ndim - 2)) if self.conv else v.reshape((1,) * (ndim - 1) + (-1,))

    def act_shift_pow(self, q):
        """2^e per channel: static (C,) or dynamic per sample (N, C) broadcast-ready."""
        torch = _t()
        if not self.dynamic:
            return self._chan(self.x_pow, q.ndim)
        C = q.shape[1] if self.conv else q.shape[-1]
        a = q.detach().abs()
        a = a.transpose(1, -1) if self.conv else a
        m_c = a.reshape(a.shape[0], -1, C).amax(dim=1)                             # (N, C)
        m = torch.zeros(a.shape[0], self.n_groups, dtype=m_c.dtype).scatter_reduce(
            1, self.rank.expand(a.shape[0], C), m_c, reduce="amax", include_self=True)
        mag = 4 if self.unsigned else 3
        e = (_bitlen(m) - mag).clamp(0, MAX_SHIFT)
        e = (e - self.offset[None, :]).clamp(min=0)
        pw = (2.0 ** e)[:, self.rank]                                               # (N, C)
        return pw.reshape(pw.shape + (1,) * (q.ndim - 2)) if self.conv else pw.reshape(
            (pw.shape[0],) + (1,) * (q.ndim - 2) + (C,))

    soft_rounding = False    # learned rounding: train with soft h (True) or evaluate settled codes

    def forward(self, x, k: int, level: Optional[float] = None, exact: bool = False):
        """Layer output with its first `k` groups in 4-bit; `level` picks the bias delta (None:
        no correction). exact=True: float64 integer arithmetic (for checks), no gradients needed."""
        torch, F = _t(), __import__("torch.nn.functional", fromlist=["conv2d"])
        dt = torch.float64 if exact else self.dtype
        s_x = torch.exp(self.log_ascale) if self.train_ascale else torch.tensor(np.float32(self.lplan.act_scale))
        q = floor_half_ste(x / s_x).clamp(self.a_lo, self.a_hi)
        if exact:
            q = torch.floor(x / s_x + 0.5).clamp(self.a_lo, self.a_hi)   # the kernels' float32 rounding
        if self.round_v is not None:
            w4, q_w = self._learned_codes(self.soft_rounding and not exact)
        else:
            q_w = round_ste(self.latent).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
        if k > 0:
            low_c = self._chan(self.rank < k, q.ndim)
            q = torch.where(low_c, lower_ste(q, self.act_shift_pow(q), self.x4_lo, self.x4_hi), q)
            low_w = (self.w_rank < k).reshape(self.w_rank.shape + (1,) * (q_w.ndim - 2))
            if self.round_v is None:
                pw = self.w_pow.reshape(self.w_pow.shape + (1,) * (q_w.ndim - 2))
                w4 = lower_ste(q_w, pw, -8, 7)
            q_w = torch.where(low_w, w4, q_w)
        q, q_w = q.to(dt), q_w.to(dt)
        if self.conv:
            s = self.spec
            pt, pl, pb, pr = s.padding
            if (pt, pl) != (pb, pr):
                q = F.pad(q, (pl, pr, pt, pb))
                pt = pl = 0
            acc = F.conv2d(q, q_w, None, s.strides, (pt, pl), s.dilation, s.groups)
        else:
            acc = q @ q_w.t()
        if exact:
            return acc
        if self.train_wscale or self.train_ascale:
            mult = torch.exp(self.log_wscale) * s_x
        else:
            mult = torch.tensor(dequant_scale(self.lplan.weight_scale, np.float32(self.lplan.act_scale)))
        b = self.bias
        if level is not None and level in self.bias_delta:
            b = b - self.bias_delta[level]
        return acc * self._chan(mult, acc.ndim) + self._chan(b, acc.ndim)


class QuantModel:
    """The whole quantized model in torch: FP32 teacher and FlexiQ student over one graph."""

    def __init__(self, model, plan: Plan, levels: Optional[Sequence[float]] = None):
        self.model, self.plan = model, plan
        self.graph = RelaxTorchGraph(model)
        self.levels = sorted(plan.levels) if levels is None else sorted(float(r) for r in levels)
        bc = {r: [d for d in plan.bias_correction[r]] for r in plan.bias_correction}
        self.layers = [QuantLayer(s, lp, self.levels, plan.dynamic,
                                  {r: bc[r][i] for r in bc}) for i, (s, lp) in enumerate(zip(model.specs, plan.layers))]
        torch = _t()
        self._float_w = [torch.tensor(s.weight) for s in model.specs]
        self._float_b = [torch.tensor(s.bias) for s in model.specs]

    def counts(self, level: float) -> np.ndarray:
        return self.plan.counts_for_ratio(level)

    def float_layer(self, i, x):
        F = _t().nn.functional
        s = self.model.specs[i]
        if s.op == "conv2d":
            pt, pl, pb, pr = s.padding
            if (pt, pl) != (pb, pr):
                x = F.pad(x, (pl, pr, pt, pb))
                pt = pl = 0
            y = F.conv2d(x, self._float_w[i], None, s.strides, (pt, pl), s.dilation, s.groups)
            return y + self._float_b[i].reshape(1, -1, 1, 1)
        return x @ self._float_w[i].t() + self._float_b[i]

    def teacher(self, x):
        return self.graph.run(x, self.float_layer)

    def layer_fn(self, level: Optional[float], counts=None):
        counts = self.counts(level) if counts is None else counts
        bias_level = level if level in self.plan.bias_correction or self._bias_trained else None
        return lambda i, x: self.layers[i].forward(x, int(counts[i]), bias_level)

    _bias_trained = False

    def student(self, x, level: float):
        return self.graph.run(x, self.layer_fn(level))

    def parameters(self, **kw) -> List:
        return [p for l in self.layers for p in l.parameters(**kw)]

    # ---- back to a plan ----------------------------------------------------------------------
    def to_plan(self, bias: bool = False) -> Plan:
        """A copy of the plan with the trained INT8 codes (and scales / per-level biases)."""
        new = Plan.loads(self.plan.dumps())
        for lp, ql in zip(new.layers, self.layers):
            lp.weight_codes = ql.codes()
            lp.weight_scale = ql.weight_scale()
            lp.act_scale = ql.act_scale()
        if bias:
            new.bias_correction = {r: [ql.bias_delta[r].detach().numpy().astype(np.float32) for ql in self.layers]
                                   for r in self.levels}
        new.validate("finetuned plan")
        return new


def check_against_reference(model, plan: Plan, x: np.ndarray, levels: Optional[Sequence[float]] = None) -> dict:
    """Per layer and level, the torch model's integer accumulators vs `quant.reference`'s, on the
    float inputs each layer receives in the FP32 model. Returns {"max_abs_diff": int, "checked": n}."""
    torch = _t()
    from ...quant.reference import reference_layers

    qm = QuantModel(model, plan)
    refs = reference_layers(model.specs, plan)
    inputs: Dict[int, np.ndarray] = {}

    def grab(i, xin):
        inputs[i] = xin.detach().numpy().copy()
        return qm.float_layer(i, xin)

    with torch.no_grad():
        qm.graph.run(torch.tensor(np.asarray(x, np.float32)), grab)
        worst, n = 0, 0
        for r in (qm.levels if levels is None else levels):
            counts = plan.counts_for_ratio(r)
            for i, ref in enumerate(refs):
                a = ref.accumulate(inputs[i], int(counts[i]))
                b = qm.layers[i].forward(torch.tensor(inputs[i]), int(counts[i]), exact=True).numpy()
                worst = max(worst, int(np.max(np.abs(a - np.rint(b).astype(np.int64)))) if a.size else 0)
                n += 1
    return {"max_abs_diff": worst, "checked": n}
