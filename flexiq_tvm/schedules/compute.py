"""TE compute definitions of the FlexiQ layer kernels (target independent).

Every factory returns a ``tvm.tirx.PrimFunc`` (built with ``te.create_prim_func``) in
destination-passing style: inputs first, the output last, all shapes static.  Each function
carries the attribute ``"flexiq.kernel"`` (one of ``quantize_act``, ``lower_weight``,
``conv2d_int8``, ``dense_int8``) so that a target (``schedules/llvm.py``) can find and schedule
it, plus a few ``"flexiq.*"`` attributes describing the layout.

Integer semantics (all on int32, ``>>`` arithmetic):

* ``lower(q, e, lo4, hi4) = clamp((q + ((1 << e) >> 1)) >> e, lo4, hi4) << e``
* activation quantization: ``q = int32(clamp(floor(f32(x) / f32(s) + 0.5f), lo, hi))``
  (true division, then add, then floor; lo,hi = -127,127 signed / 0,255 unsigned); the kernels
  may compute the same integers another way (`_clamped_code`, `_merge_act_bounds`)
* channel ``c`` is low iff ``rank[c] < counts[layer_index]`` (``counts`` is a run-time input)
* dynamic extraction (``quantize_act(dynamic=True)``, attr ``flexiq.dynamic``): the shift of a
  low channel is ``e[n, rank[c]]`` from the live codes of sample ``n`` (max |q| of the group),
  ``e = (m>=8)+(m>=16)+(m>=32)+(m>=64)`` signed / ``(m>=16)+..+(m>=128)`` unsigned

Weight layouts produced by :func:`lower_weight` and consumed by :func:`conv2d_int8` /
:func:`dense_int8` (``ob`` = output-channel block, always a divisor of ``O // groups`` so a block
never straddles two conv groups):

* ``"OIHWo"``: ``[O // ob, Cg, KH, KW, ob]``, ``w_l[oo, ci, kh, kw, oi] = w'[oo*ob + oi, ci, kh, kw]``
* ``"OIHWo4i"`` (VNNI): ``[O // ob, ceil(Cg/4), KH, KW, ob, 4]``,
  ``w_l[oo, cb, kh, kw, oi, j] = w'[oo*ob + oi, 4*cb + j, kh, kw]`` (0 for ``4*cb + j >= Cg``)
* dense ``"OIo"``: ``[O // ob, C, ob]``

(``w'`` = the lowered weight).  :func:`choose_conv_layout` picks the conv layout
deterministically from (O, groups, Cg); :func:`conv_weight_layout_shape` /
:func:`dense_weight_layout_shape` give the shape; :func:`prepack_weight` does the re-layout in
numpy (for ``lower_weight(..., w_prepacked=True)``).

Note on index dtypes (tvm027.md section 3): index variables are never mixed into data
arithmetic here; all data math is on int32/float32 values loaded from buffers.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import tvm
from tvm import te

KERNEL_ATTR = "flexiq.kernel"

__all__ = [
    "KERNEL_ATTR",
    "choose_ob",
    "conv_out_shape",
    "conv_weight_layout_shape",
    "dense_weight_layout_shape",
    "quantize_act",
    "lower_weight",
    "prepack_weight",
    "choose_conv_layout",
    "conv2d_int8",
    "dense_int8",
]


# --------------------------------------------------------------------------- helpers
def _i32(v):
    return tvm.tirx.const(int(v), "int32")


def _lower_expr(q, e, lo4: int, hi4: int):
    """clamp((q + ((1 << e) >> 1)) >> e, lo4, hi4) << e on int32 exprs."""
    one = _i32(1)
    rnd = tvm.tirx.shift_right(tvm.tirx.shift_left(one, e), one)
    v = tvm.tirx.shift_right(q + rnd, e)
    v = tvm.tirx.max(tvm.tirx.min(v, _i32(hi4)), _i32(lo4))
    return tvm.tirx.shift_left(v, e)


def _act_bounds_as_codes(act, scale: float):
    """The codes ``floor(f32(b) / f32(s) + 0.5f)`` of an activation's bounds ``act=(lo, hi)``
    (None: unbounded), in float32 exactly as the kernels compute them.

    Why: the code is a non-decreasing function ``F`` of the float value (each float32 operation
    rounds monotonically), so ``F(clamp(v, a, b)) = clamp(F(v), F(a), F(b))``: a requantizing
    epilogue clamps the code to these bounds instead of clamping the float, two vector
    operations fewer per 16 outputs and the same integers."""
    if act is None:
        return None, None
    s = np.float32(scale)

    def code(b):
        return None if b is None else float(np.floor(np.float32(b) / s + np.float32(0.5)))

    return code(act[0]), code(act[1])


def _clamped_code(v, scale: float, lo, hi, lo_nonneg: bool):
    """``clamp(floor(v / s + 0.5), lo, hi)`` as int32, for integer-valued float32 bounds.

    With ``lo >= 0`` the floor is left to the conversion: for integer bounds ``clamp(floor(y),
    lo, hi) = floor(clamp(y, lo, hi))``, and a non-negative value's truncation is its floor, so
    one vector operation per 16 outputs goes and the integers stay the same."""
    y = v / tvm.tirx.const(float(scale), "float32") + tvm.tirx.const(0.5, "float32")
    if not lo_nonneg:
        y = tvm.tirx.floor(y)
    return tvm.tirx.max(tvm.tirx.min(y, hi), lo).astype("int32")


def _merge_act_bounds(lo, hi, act, scale: float):
    """Fold the activation ``act = (a, b)`` into the code bounds ``lo``, ``hi`` (float32 exprs):
    ``max(min(clamp(F(v), F(a), F(b)), hi), lo) = max(min(F(v), hi'), lo')`` with ``hi' =
    min(F(b), hi)`` and ``lo' = max(min(F(a), hi'), lo)`` (the inner ``min`` keeps it right when
    the two ranges do not overlap). Returns ``lo', hi'`` and whether ``lo' >= 0`` is known from
    ``act``: when ``F(a) >= 0``, since then ``F(b) >= F(a) >= 0`` and every ``hi`` the kernels use
    is >= 0, so ``min(F(a), hi') >= 0``."""
    fa, fb = _act_bounds_as_codes(act, scale)
    if fb is not None:
        hi = tvm.tirx.min(tvm.tirx.const(fb, "float32"), hi)
    if fa is not None:
        lo = tvm.tirx.max(tvm.tirx.min(tvm.tirx.const(fa, "float32"), hi), lo)
    return lo, hi, fa is not None and fa >= 0


def _act_code_or_lowered(v, scale: float, unsigned: bool, low, e, lo4: int, hi4: int, act=None):
    """The INT8 code of ``v`` (:func:`_act_code`), lowered (:func:`_lower_expr` with shift ``e``)
    where ``low``, without a branch and with two integer operations more than the code alone.

    Lowering is ``g(q) = (q + r) & -2^e`` (``r = 2^e >> 1``) clamped to ``[lo4, hi4] * 2^e``; ``g``
    is monotone and those bounds are multiples of ``2^e``, so the clamp moves before it:
    ``clamp(g(q), L, H) = g(clamp(q, L - r, H + 2^e - r - 1))``, and the two clamps (INT8 range,
    then that one) are one clamp to the intersection. An INT8 channel takes ``e = 0``, for which
    ``g`` is the identity and the bounds are the INT8 range. The bounds are per channel, so the
    float clamp the code always had does both jobs; what is left per element is ``+ r`` and the mask.
    ``act`` (a requantizing epilogue's activation, not applied to ``v``) joins the same clamp
    (:func:`_merge_act_bounds`)."""
    lo8, hi8 = (0, 255) if unsigned else (-127, 127)
    e = tvm.tirx.Select(low, e, _i32(0))
    step = tvm.tirx.shift_left(_i32(1), e)
    rnd = tvm.tirx.shift_right(step, _i32(1))
    lo = tvm.tirx.max(tvm.tirx.shift_left(_i32(lo4), e) - rnd, _i32(lo8))
    hi = tvm.tirx.min(tvm.tirx.shift_left(_i32(hi4), e) + step - rnd - _i32(1), _i32(hi8))
    lo = tvm.tirx.Select(low, lo, _i32(lo8)).astype("float32")
    hi = tvm.tirx.Select(low, hi, _i32(hi8)).astype("float32")
    lo, hi, act_nonneg = _merge_act_bounds(lo, hi, act, scale)
    q = _clamped_code(v, scale, lo, hi, unsigned or act_nonneg)
    return (q + rnd) & (_i32(0) - step)


def _act_code(v, scale: float, unsigned: bool, act=None):
    """The INT8 code of float32 activation ``v``: ``clamp(floor(v / s + 0.5), lo, hi)`` as int32
    (METHOD section 1), the one definition the quantize kernel and a requantizing epilogue share;
    ``act`` as in :func:`_act_code_or_lowered`."""
    lo, hi = (0.0, 255.0) if unsigned else (-127.0, 127.0)
    lo, hi, act_nonneg = _merge_act_bounds(tvm.tirx.const(lo, "float32"), tvm.tirx.const(hi, "float32"), act, scale)
    return _clamped_code(v, scale, lo, hi, unsigned or act_nonneg)


def _no_contract(v):
    """Wrap a float product in ``llvm.arithmetic.fence`` so that LLVM (TVM enables FP-op fusion
    for llvm targets) cannot contract ``p + bias`` into an FMA: the epilogue then rounds twice,
    exactly like numpy's ``f32(acc) * scale + bias``.  llvm targets only (codegen emits the LLVM
    intrinsic; on x86 it costs nothing)."""
    return tvm.tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", v)


def _clamp_act(v, act):
    """The activation folded into a float epilogue: ``min(max(v, lo), hi)`` on float32, exactly
    what Relax's relu / clip / maximum / minimum compute after the layer (None: no bound)."""
    if act is None:
        return v
    lo, hi = act
    if lo is not None:
        v = tvm.tirx.max(v, tvm.tirx.const(float(lo), "float32"))
    if hi is not None:
        v = tvm.tirx.min(v, tvm.tirx.const(float(hi), "float32"))
    return v


def _act_attrs(act) -> dict:
    if act is None:
        return {}
    return {"act_lo": "none" if act[0] is None else float(act[0]),
            "act_hi": "none" if act[1] is None else float(act[1])}


def _norm_pad(pad) -> Tuple[int, int, int, int]:
    """pad -> (top, left, bottom, right). Accepts int, (ph, pw) or (t, l, b, r)."""
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return (pad[0], pad[1], pad[0], pad[1])
    if len(pad) == 4:
        return pad
    raise ValueError(f"bad padding {pad}")


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    assert len(v) == 2
    return v


def choose_ob(out_channels: int, groups: int = 1, max_ob: int = 16) -> int:
    """Output-channel block: the largest divisor of O // groups that is <= max_ob.

    Prefers powers of two (16, 8, 4) when they divide; depthwise (O // groups == 1) gives 1.
    """
    opg = out_channels // groups
    for cand in (16, 8, 4):
        if cand <= max_ob and opg % cand == 0:
            return cand
    for cand in range(min(max_ob, opg), 0, -1):
        if opg % cand == 0:
            return cand
    return 1


def choose_conv_layout(out_channels: int, groups: int, cg: int) -> Tuple[str, int]:
    """(weight layout, ob) the llvm kernels use for a conv; deterministic so that lower_weight and
    conv2d_int8 agree when both are called with defaults.

    * ``"OIHWo4i"`` (VNNI): ``[O//ob, ceil(Cg/4), KH, KW, ob, 4]``, ob in {16, 8}; chosen when
      ``O//groups`` is a multiple of 8 and ``Cg >= 4`` (4 input channels per vpdpbusd lane).
    * ``"OIHWo"`` (blocked): ``[O//ob, Cg, KH, KW, ob]``, ob = :func:`choose_ob` (1 = depthwise).
    """
    opg = out_channels // groups
    if cg >= 4 and opg % 8 == 0:
        return "OIHWo4i", (16 if opg % 16 == 0 else 8)
    return "OIHWo", choose_ob(out_channels, groups)


def conv_out_shape(x_padded_shape, w_shape, strides=1, dilation=1):
    """Output (N, O, OH, OW) of a conv over an already padded input."""
    n, _, hp, wp = (int(v) for v in x_padded_shape)
    o, _, kh, kw = (int(v) for v in w_shape)
    sh, sw = _pair(strides)
    dh, dw = _pair(dilation)
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    return (n, o, oh, ow)


def conv_weight_layout_shape(w_shape, groups: int = 1, ob: int | None = None,
                             layout: str | None = None):
    """Shape of the lowered weight (output of lower_weight, input of conv2d_int8)."""
    o, cg, kh, kw = (int(v) for v in w_shape)
    layout, ob = _resolve_layout(o, groups, cg, layout, ob)
    if layout == "OIHWo4i":
        return (o // ob, (cg + 3) // 4, kh, kw, ob, 4)
    return (o // ob, cg, kh, kw, ob)


def _resolve_layout(o, groups, cg, layout, ob):
    if layout is None:
        layout, ob_default = choose_conv_layout(o, groups, cg)
        if ob is not None and layout == "OIHWo4i" and int(ob) not in (8, 16):
            layout, ob_default = "OIHWo", choose_ob(o, groups)
    elif layout == "OIHWo4i":
        ob_default = 16 if (o // groups) % 16 == 0 else 8
    elif layout == "OIHWo":
        ob_default = choose_ob(o, groups)
    else:
        raise ValueError(f"unknown weight layout {layout!r}")
    ob = ob_default if ob is None else int(ob)
    assert (o // groups) % ob == 0, (o, groups, ob)
    return layout, ob


def dense_weight_layout_shape(w_shape, ob: int | None = None):
    o, c = (int(v) for v in w_shape)
    ob = choose_ob(o, 1) if ob is None else int(ob)
    return (o // ob, c, ob)


def _finish(func, kind: str, **attrs):
    # te.create_prim_func sets global_symbol="main"; drop it so that several kernels can live in
    # one IRModule (bb.add_func(f, name) / tvm.compile attach the GlobalVar's name).
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    func = func.with_attr(KERNEL_ATTR, kind)
    for k, v in attrs.items():
        func = func.with_attr("flexiq." + k, v)
    return func


def _pack4_words(qval, code, shape, groups: int, Cg: int, pad, unsigned: bool, is_low):
    """The ``quantize_act(pack4=(groups, Cg))`` output stage, shared with a requantizing conv
    epilogue (``conv2d_int8(requant=dict(pack4=...))``): uint32 ``[N, groups * ceil(Cg/4), Hp,
    Wp]`` whose byte ``j`` is the code of channel ``4 * cb + j`` of its group (+128 when signed).
    ``qval(n, c, h, w)`` is the lowered code, ``code`` the INT8 one, ``is_low(c)`` whether
    channel ``c`` is lowered at the current ratio."""
    CB = (Cg + 3) // 4
    pt, pl, pb, pr = _norm_pad(pad)
    N, _, H, W = (int(v) for v in shape)

    def byte(v, j):
        v = v.astype("int32") if unsigned else v.astype("int32") + _i32(128)
        return tvm.tirx.shift_left(v.astype("uint32"), tvm.tirx.const(8 * j, "uint32"))

    # bytes of channels past Cg meet zero weights (the weight layout pads with 0), so any
    # value does: they repeat the group's last channel, and the border fill is one constant
    def packed(n, b, h, w):
        chans = [(b // CB) * Cg + (tvm.tirx.min((b % CB) * 4 + j, _i32(Cg - 1)) if Cg % 4 else (b % CB) * 4 + j)
                 for j in range(4)]

        def word(lowering):
            out = tvm.tirx.const(0, "uint32")
            for j, c in enumerate(chans):
                out = out | byte(qval(n, c, h, w) if lowering else code(n, c, h, w), j)
            return out

        # one test per word row: a row of four INT8 channels (every row at ratio 0) skips the
        # lowering's arithmetic and selects
        any_low = is_low(chans[0])
        for c in chans[1:]:
            any_low = tvm.tirx.Or(any_low, is_low(c))
        return tvm.tirx.if_then_else(any_low, word(True), word(False))

    fill = tvm.tirx.const(0 if unsigned else 0x80808080, "uint32")
    oshape = (N, groups * CB, H + pt + pb, W + pl + pr)
    if pt or pl or pb or pr:
        def fcomp(n, b, h, w):
            inside = tvm.tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
            return tvm.tirx.if_then_else(inside, packed(n, b, h - pt, w - pl), fill)
    else:
        fcomp = packed
    return te.compute(oshape, fcomp, name="q")


# --------------------------------------------------------------------------- quantize_act
def quantize_act(
    shape: Sequence[int],
    channel_axis: int,
    pad=0,
    scale: float = 1.0,
    unsigned: bool = False,
    layer_index: int = 0,
    num_layers: int = 1,
    dynamic: bool = False,
    n_groups: int | None = None,
    pack4=None,
) -> tvm.tirx.PrimFunc:
    """Quantize float32 activations, lowering the run-time-selected low channels.

    NCHW (``channel_axis=1``, 4-D ``shape``): params ``(x f32[N,C,H,W], counts i32[L],
    rank i32[C], shift i32[C], q[N, C, H+pt+pb, W+pl+pr])``; ``pad`` is an int, ``(ph, pw)``
    or ``(top, left, bottom, right)``; the border is 0.
    Channel-last (``channel_axis = len(shape) - 1``, e.g. dense ``[M, C]`` or tokens
    ``[N, T, C]``): same params, ``q`` has the shape of ``x`` (``pad`` must be 0).
    ``q`` is int8 (signed, [-127, 127], 4-bit [-8, 7]) or uint8 (unsigned, [0, 255], 4-bit
    [0, 15]).

    ``dynamic=True`` (dynamic extraction): ``shift`` holds a per-channel *offset* instead (0 for
    the plain max rule); the shift of low channel ``c`` of sample ``n`` (axis 0) is
    ``max(e[n, rank[c]] - shift[c], 0)`` with ``m[n, g] = max |q0|`` over the channels of group
    ``g`` and all other positions of sample ``n`` (padding excluded), ``e = clamp(bitlen(m) - (4 if
    unsigned else 3), 0, 4)``.  Stages (blocks): ``q0`` codes, ``x_max`` per (n, c), ``g_max`` per (n, g),
    ``e_c`` the shift of each (n, c) (-1 = not low), ``q`` the lowered (padded) output.
    ``n_groups`` bounds the group ids (default ``C``; only ``rank[c] < n_groups`` can be low).

    ``pack4=(groups, Cg)`` (static NCHW only; the llvm target's choice before a VNNI conv): ``q``
    is written directly in the layout that ``conv2d_int8(packed_input=True)`` reads, as uint32
    ``[N, groups * ceil(Cg/4), Hp, Wp]`` whose byte ``j`` (little endian) is the code of channel
    ``4 * cb + j`` of its group, +128 when signed (channels past ``Cg`` hold a copy of the last
    one: their weights are 0). One vectorizable
    pass instead of the quantize pass plus the conv's byte-interleaving repack.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    channel_axis = channel_axis % nd
    C = shape[channel_axis]
    L = int(num_layers)
    li = int(layer_index)
    assert 0 <= li < L
    lo4, hi4, odt = (0, 15, "uint8") if unsigned else (-8, 7, "int8")

    x = te.placeholder(shape, "float32", name="x")
    counts = te.placeholder((L,), "int32", name="counts")
    rank = te.placeholder((C,), "int32", name="rank")
    shift = te.placeholder((C,), "int32", name="shift")
    def code(*idx):
        return _act_code(x(*idx), scale, unsigned)

    # Whether a channel is lowered is one scalar test per channel. Static NCHW rows fold it into
    # per-channel clamp bounds and a mask (`_act_code_or_lowered`: no branch, two integer ops more
    # than the INT8 code; the per-row branch it replaces was mispredicted on the random pattern of
    # low channels: 5-10% slower kernels at ratio 0.5 than at 0). Channel-last layouts keep a `Select`
    # (a vector condition would make TVM scalarize the loop); so does `pack4` under its one test
    # per word; dynamic NCHW rows branch per (sample, channel).
    choose = tvm.tirx.Select if (channel_axis == nd - 1 or pack4 is not None) else tvm.tirx.if_then_else

    if not dynamic:
        def qval(*idx):
            c = idx[channel_axis]
            if channel_axis != nd - 1 and pack4 is None:
                return _act_code_or_lowered(x(*idx), scale, unsigned, rank[c] < counts[li], shift[c], lo4, hi4).astype(odt)
            q = code(*idx)
            low = rank[c] < counts[li]
            q = choose(low, _lower_expr(q, shift[c], lo4, hi4), q)
            return q.astype(odt)
    else:
        if not ((nd == 4 and channel_axis == 1) or (nd >= 2 and channel_axis == nd - 1)):
            raise ValueError("dynamic extraction needs NCHW or channel-last activations")
        G = C if n_groups is None else int(n_groups)
        assert 1 <= G <= C, (G, C)
        N = shape[0]
        zero = _i32(0)
        minus1 = _i32(-1)
        # stage 1: INT8 codes (same float math as the static kernel), stored in the output dtype
        q0 = te.compute(shape, lambda *idx: code(*idx).astype(odt), name="q0")
        # stage 2: per (sample, channel) max |code| over all other axes
        others = [a for a in range(1, nd) if a != channel_axis]
        if others:
            raxes = [te.reduce_axis((0, shape[a]), name=f"r{a}") for a in others]

            def fmax(n, c):
                idx = [n] + [None] * (nd - 1)
                idx[channel_axis] = c
                for a, r in zip(others, raxes):
                    idx[a] = r
                return te.max(tvm.tirx.abs(q0[tuple(idx)].astype("int32")), axis=raxes)

            xmax = te.compute((N, C), fmax, name="x_max")
        else:  # [N, C]: one position per sample
            xmax = te.compute((N, C), lambda n, c: tvm.tirx.abs(q0[n, c].astype("int32")),
                              name="x_max")
        # stage 3: per (sample, group) max over the group's channels, then the shift
        rc = te.reduce_axis((0, C), name="rc")
        gmax = te.compute(
            (N, G),
            lambda n, g: te.max(tvm.tirx.Select(rank[rc] == g, xmax[n, rc], zero), axis=[rc]),
            name="g_max")
        ths = (16, 32, 64, 128) if unsigned else (8, 16, 32, 64)

        def shift_of(n, c):
            r = rank[c]
            m = gmax[n, tvm.tirx.max(tvm.tirx.min(r, _i32(G - 1)), zero)]
            e = zero
            for t in ths:
                e = e + (m >= _i32(t)).astype("int32")
            e = tvm.tirx.max(e - shift[c], zero)
            return tvm.tirx.Select(r < counts[li], e, minus1)

        ec = te.compute((N, C), shift_of, name="e_c")

        # stage 4: lowering
        def qval(*idx):
            c = idx[channel_axis]
            v = q0(*idx).astype("int32")
            e = ec[idx[0], c]
            lv = _lower_expr(v, tvm.tirx.max(e, zero), lo4, hi4)
            return choose(e >= zero, lv, v).astype(odt)

    if pack4 is not None:
        if dynamic or not (nd == 4 and channel_axis == 1):
            raise ValueError("pack4 needs a static NCHW quantize")
        groups, Cg = (int(v) for v in pack4)
        assert Cg * groups == C, (pack4, C)
        q = _pack4_words(qval, lambda *idx: code(*idx).astype(odt), shape, groups, Cg, pad, unsigned,
                         lambda c: rank[c] < counts[li])
        func = te.create_prim_func([x, counts, rank, shift, q])
        return _finish(func, "quantize_act", layout="NCHW4c", layer_index=li, unsigned=bool(unsigned),
                       dynamic=False, pack_groups=groups, pack_cg=Cg)
    if nd == 4 and channel_axis == 1:
        pt, pl, pb, pr = _norm_pad(pad)
        N, _, H, W = shape
        oshape = (N, C, H + pt + pb, W + pl + pr)
        if pt or pl or pb or pr:

            def fcomp(n, c, h, w):
                inside = tvm.tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
                return tvm.tirx.if_then_else(
                    inside, qval(n, c, h - pt, w - pl), tvm.tirx.const(0, odt))
        else:
            fcomp = qval
        q = te.compute(oshape, fcomp, name="q")
        layout = "NCHW"
        geometry = dict(pad=[pt, pl, pb, pr])
    else:
        if _norm_pad(pad) != (0, 0, 0, 0):
            raise ValueError("padding is only supported for the NCHW layout")
        q = te.compute(shape, qval, name="q")
        layout = "NC"
        geometry = {}
    func = te.create_prim_func([x, counts, rank, shift, q])
    return _finish(func, "quantize_act", layout=layout, layer_index=li, unsigned=bool(unsigned),
                   dynamic=bool(dynamic), scale=float(scale), num_layers=L, channel_axis=channel_axis,
                   **({"n_groups": int(n_groups)} if n_groups is not None else {}), **geometry)


# --------------------------------------------------------------------------- lower_weight
def lower_weight(
    w_shape: Sequence[int],
    groups: int = 1,
    n_groups: int = 1,
    layer_index: int = 0,
    num_layers: int = 1,
    in_channels: int | None = None,
    ob: int | None = None,
    layout: str | None = None,
    w_prepacked: bool = False,
) -> tvm.tirx.PrimFunc:
    """Lower the low channels of an INT8 weight and re-layout it for the conv/dense kernel.

    Params ``(w i8[O,Cg,KH,KW] | i8[O,C], counts i32[L], rank i32[C], wshift i32[O,n_groups],
    w_l)``; ``w_l`` is int8 ``[O//ob, Cg, KH, KW, ob]`` (conv) or ``[O//ob, C, ob]`` (dense).
    ``n_groups`` is the number of lowering groups of the layer (columns of ``wshift``).

    ``w_prepacked=True``: the ``w`` parameter is ALREADY in the kernel layout (same shape as
    ``w_l``, produced offline by :func:`prepack_weight`), so the per-call byte transpose is
    skipped and the kernel is a purely elementwise, vectorized pass (~10x cheaper). ``w_shape``
    stays the logical shape.
    """
    w_shape = tuple(int(s) for s in w_shape)
    L, li = int(num_layers), int(layer_index)
    counts = te.placeholder((L,), "int32", name="counts")
    if w_prepacked:
        if len(w_shape) == 4:
            packed_shape = conv_weight_layout_shape(w_shape, groups, ob, layout)
        else:
            packed_shape = dense_weight_layout_shape(w_shape, ob)
        w = te.placeholder(packed_shape, "int8", name="w")
    else:
        w = te.placeholder(w_shape, "int8", name="w")
    zero8 = tvm.tirx.const(0, "int8")
    minus1 = tvm.tirx.const(-1, "int32")

    # Three stages (all fused in one PrimFunc): w_e = the shift of each (o, c) pair, or -1 when c
    # is not low (O*C values, in the output's (o, c) order); w_t = the raw weight moved into the
    # output layout (a byte transpose); w_l = lower(w_t, w_e) elementwise (vectorizes: w_e is
    # contiguous along the output's innermost axes).
    def shift_of(o, c):
        r = rank[c]
        return tvm.tirx.Select(r < counts[li], wshift[o, r], minus1)

    def apply(v8, e):
        v = v8.astype("int32")
        lv = _lower_expr(v, tvm.tirx.max(e, _i32(0)), -8, 7)
        return tvm.tirx.Select(e >= 0, lv, v).astype("int8")

    if len(w_shape) == 4:
        O, Cg, KH, KW = w_shape
        C = Cg * groups if in_channels is None else int(in_channels)
        assert C == Cg * groups and O % groups == 0
        opg = O // groups
        layout, ob = _resolve_layout(O, groups, Cg, layout, ob)
        bpg = opg // ob
        rank = te.placeholder((C,), "int32", name="rank")
        wshift = te.placeholder((O, int(n_groups)), "int32", name="wshift")

        if layout == "OIHWo":
            we = te.compute(
                (O // ob, Cg, ob),
                lambda oo, ci, oi: shift_of(oo * ob + oi, (oo // bpg) * Cg + ci), name="w_e")
            wt = w if w_prepacked else te.compute(
                (O // ob, Cg, KH, KW, ob),
                lambda oo, ci, kh, kw, oi: w[oo * ob + oi, ci, kh, kw], name="w_t")
            wl = te.compute(
                (O // ob, Cg, KH, KW, ob),
                lambda oo, ci, kh, kw, oi: apply(wt[oo, ci, kh, kw, oi], we[oo, ci, oi]),
                name="w_l")
        else:
            CB = (Cg + 3) // 4

            def fe(oo, cb, oi, j):
                ci = cb * 4 + j
                e = shift_of(oo * ob + oi, (oo // bpg) * Cg + ci)
                return e if Cg % 4 == 0 else tvm.tirx.if_then_else(ci < Cg, e, minus1)

            def ft(oo, cb, kh, kw, oi, j):
                ci = cb * 4 + j
                v = w[oo * ob + oi, ci, kh, kw]
                return v if Cg % 4 == 0 else tvm.tirx.if_then_else(ci < Cg, v, zero8)

            we = te.compute((O // ob, CB, ob, 4), fe, name="w_e")
            wt = w if w_prepacked else te.compute((O // ob, CB, KH, KW, ob, 4), ft, name="w_t")
            wl = te.compute(
                (O // ob, CB, KH, KW, ob, 4),
                lambda oo, cb, kh, kw, oi, j: apply(wt[oo, cb, kh, kw, oi, j], we[oo, cb, oi, j]),
                name="w_l")
    elif len(w_shape) == 2:
        assert groups == 1
        O, C = w_shape
        ob = choose_ob(O, 1) if ob is None else int(ob)
        assert O % ob == 0
        rank = te.placeholder((C,), "int32", name="rank")
        wshift = te.placeholder((O, int(n_groups)), "int32", name="wshift")
        we = te.compute((O // ob, C, ob), lambda oo, c, oi: shift_of(oo * ob + oi, c), name="w_e")
        wt = w if w_prepacked else te.compute((O // ob, C, ob),
                                              lambda oo, c, oi: w[oo * ob + oi, c], name="w_t")
        wl = te.compute((O // ob, C, ob),
                        lambda oo, c, oi: apply(wt[oo, c, oi], we[oo, c, oi]), name="w_l")
        layout = "OIo"
    else:
        raise ValueError(f"bad weight shape {w_shape}")
    func = te.create_prim_func([w, counts, rank, wshift, wl])
    return _finish(func, "lower_weight", layout=layout, ob=int(ob), groups=int(groups),
                   layer_index=li, w_prepacked=bool(w_prepacked))


def prepack_weight(w, groups: int = 1, ob: int | None = None, layout: str | None = None):
    """numpy: logical int8 weight ``[O, Cg, KH, KW]`` / ``[O, C]`` -> the kernel layout that
    :func:`lower_weight` (``w_prepacked=True``) and conv2d_int8 / dense_int8 use (offline, once;
    input channels zero-padded to a multiple of 4 for ``"OIHWo4i"``)."""
    w = np.asarray(w)
    O = w.shape[0]
    if w.ndim == 2:
        ob = choose_ob(O, 1) if ob is None else int(ob)
        return np.ascontiguousarray(np.moveaxis(w.reshape(O // ob, ob, w.shape[1]), 1, -1))
    Cg = w.shape[1]
    layout, ob = _resolve_layout(O, groups, Cg, layout, ob)
    if layout == "OIHWo":
        r = w.reshape((O // ob, ob) + w.shape[1:])
        return np.ascontiguousarray(np.moveaxis(r, 1, -1))
    CB = (Cg + 3) // 4
    wp = np.zeros((O, CB * 4) + w.shape[2:], w.dtype)
    wp[:, :Cg] = w
    r = wp.reshape((O // ob, ob, CB, 4) + w.shape[2:])  # oo, oi, cb, j, kh, kw
    return np.ascontiguousarray(r.transpose(0, 2, 4, 5, 1, 3))


# --------------------------------------------------------------------------- conv / dense
def conv2d_int8(
    x_padded_shape: Sequence[int],
    w_shape: Sequence[int],
    strides=1,
    dilation=1,
    groups: int = 1,
    unsigned: bool = False,
    out: str = "float",
    ob: int | None = None,
    exact_epilogue: bool = True,
    layout: str | None = None,
    full_rows: bool = False,
    act=None,
    packed_input: bool = False,
    spatial_lanes: bool = False,
    pair_cols: bool = False,
    requant: dict | None = None,
    flat_plane: bool = False,
    residual: bool = False,
    amx: bool = False,
) -> tvm.tirx.PrimFunc:
    """INT8 conv2d over an already padded NCHW input, weight in the lowered layout.

    ``w_shape`` is the LOGICAL weight shape ``(O, Cg, KH, KW)``.  Params
    ``(qx i8|u8[N,C,Hp,Wp], w_l i8[conv_weight_layout_shape(...)], scale f32[O], bias f32[O], y)``;
    ``y`` is f32 ``[N,O,OH,OW]`` = ``f32(acc) * scale[o] + bias[o]`` (``out="float"``) or the
    int32 accumulator (``out="acc"``).

    ``full_rows=True`` (depthwise ``"OIHWo"`` with ``ob == 1`` and a horizontal stride > 1; the
    llvm target's choice): the accumulator is computed at every input column of an output row
    (stride 1 along w, ``(OW - 1) * sw + 1`` columns) and the epilogue picks every ``sw``-th. The
    MACs along w grow ``sw``-fold, but the inner loop reads contiguous bytes and vectorizes; with
    a strided read it runs scalar (MobileNetV2's stride-2 depthwise convs: 2-4 GMAC/s). Same
    integers as the plain form.

    ``act=(lo, hi)`` (either may be None; ``out="float"`` only): the activation that follows the
    layer (ReLU, ReLU6, clip) applied in the epilogue, saving a pass over the output. With
    ``requant`` it clamps the reader's codes instead of the float (same integers, fewer vector
    operations: ``_merge_act_bounds``).

    ``packed_input=True`` (``"OIHWo4i"`` only): ``qx`` is already the repacked uint8
    ``[N, groups * ceil(Cg/4), Hp, Wp, 4]`` (``quantize_act(pack4=...)`` viewed as bytes), so the
    kernel has no repack stage.

    ``spatial_lanes=True`` (packed 1x1, stride 1, unpadded, one group, ``OH * OW % 16 == 0``):
    ``qx`` is the packed input viewed as ``[N, ceil(C/4), OH * OW, 4]`` and the accumulator is
    laid out ``[N, O // ob, ob, OH * OW]``, so the VNNI instruction accumulates 16 output
    positions of one channel (``x86_intrin.VNNI_S16x4``) and the NCHW epilogue reads and writes
    whole rows; the channel-lane form transposes every tile into NCHW (the epilogue then costs
    more than the MACs on MobileNetV2's wide, shallow pointwise convs).

    ``pair_cols=True`` (``"OIHWo"``, horizontal stride 2; the llvm target's form of MobileNet's
    stride-2 depthwise convs): ``qx`` is the padded input viewed as uint16 ``[N, C, Hp,
    ceil(Wp/2)]`` (the quantize kernel pads one more zero column when ``Wp`` is odd), so byte 0
    of word ``j`` is column ``2j`` and byte 1 column ``2j + 1``. Tap ``rw`` of output column
    ``ow`` is byte ``(rw*dw) % 2`` of word ``ow + (rw*dw) // 2``: every load is contiguous along
    the output row, no MAC is wasted on skipped columns (``full_rows`` computes twice the MACs and
    gathers every other one), and the input is never re-laid out. Same integers.

    ``flat_plane=True`` (``"OIHWo"`` depthwise, ``ob == 1``, stride 1; the llvm target's form of
    the depthwise convs over small planes): ``qx`` is the padded input viewed as ``[N, C, (Hp + 1)
    * Wp]`` (the quantize kernel writes one more zero row), and the accumulator runs over the
    flattened plane, ``acc[P] = sum qx[P + rh*dh*Wp + rw*dw] * w`` for ``P = oh * Wp + ow`` over
    whole padded rows: every tap is one contiguous load however narrow the rows (a 7-wide row
    fills 7 of 16 lanes when vectorized along ``ow``), at the cost of ``Wp - OW`` discarded
    columns per row, which the epilogue skips. Same integers.

    ``residual=True`` (``out="float"``; the llvm target's fusion of the residual add that reads
    the layer's output): one more parameter ``res`` f32 ``[N, O, OH, OW]`` before ``y``, and ``y =
    act(f32(acc) * scale + bias) + res``, the float32 add Relax's ``add`` computes (either operand
    order gives the same IEEE sum), so the layer's own output is never written.

    ``requant=dict(scale, unsigned, pad, layer_index, num_layers)`` (``out="float"``; the llvm
    target's fusion of a conv with the quantize kernel of its only reader): the epilogue goes on to
    write that reader's codes, exactly what ``quantize_act(y, ...)`` writes from the float ``y``
    (same float32 operations, the same lowering of the run-time low channels), padded by ``pad``
    with zeros. Params ``(qx, w_l, scale, bias, counts, rank, shift, q)``; ``counts``, ``rank`` and
    ``shift`` are the reader's, ``q`` is uint8 or int8 ``[N, O, OH + pt + pb, OW + pl + pr]``.
    The float map is never written. With ``pack4=(groups, Cg)`` in the dict (the reader is a VNNI
    conv: ``quantize_act(pack4=...)``), ``q`` is that kernel's uint32 words instead, four channels'
    codes per word; the llvm target uses it for depthwise convs (``"OIHWo"``, ``ob == 1``) with
    large float maps, which the quantize kernel would otherwise read back.

    ``amx=True`` (``spatial_lanes`` with ``ob == 1``; the llvm target's form of those convs on CPUs
    with Intel AMX): the same computation, which the schedule runs on AMX tile instructions
    (``x86_amx.py``); ``ob == 1`` makes the weight ``[O, C/4, 4]``, one output channel per tile row.
    Any plane size (a narrower tile takes the last ``OH * OW % 16`` positions).
    """
    N, C, Hp, Wp = (int(v) for v in x_padded_shape)
    O, Cg, KH, KW = (int(v) for v in w_shape)
    assert C == Cg * groups and O % groups == 0, (x_padded_shape, w_shape, groups)
    sh, sw = _pair(strides)
    dh, dw = _pair(dilation)
    _, _, OH, OW = conv_out_shape(x_padded_shape, w_shape, strides, dilation)
    assert OH > 0 and OW > 0
    opg = O // groups
    layout, ob = _resolve_layout(O, groups, Cg, layout, ob)
    bpg = opg // ob  # o-blocks per conv group

    if packed_input and layout != "OIHWo4i":
        raise ValueError("packed_input needs the OIHWo4i (VNNI) layout")
    if spatial_lanes and not (packed_input and layout == "OIHWo4i" and groups == 1 and KH == KW == 1
                              and (sh, sw) == (1, 1) and (OH, OW) == (Hp, Wp) and (amx or (OH * OW) % 16 == 0)):
        raise ValueError("spatial_lanes needs a packed, unpadded 1x1 stride-1 conv with OH*OW % 16 == 0 "
                         "(any OH*OW with amx)")
    if amx and not (spatial_lanes and ob == 1):
        raise ValueError("amx needs spatial_lanes and ob == 1")
    pair_cols = bool(pair_cols) and layout == "OIHWo" and sw == 2 and not packed_input
    flat_plane = (bool(flat_plane) and layout == "OIHWo" and ob == 1 and (sh, sw) == (1, 1)
                  and not (packed_input or pair_cols))
    if spatial_lanes:
        qx = te.placeholder((N, (Cg + 3) // 4, OH * OW, 4), "uint8", name="qx")
    elif pair_cols:
        qx = te.placeholder((N, C, Hp, (Wp + 1) // 2), "uint16", name="qx")
    elif flat_plane:
        qx = te.placeholder((N, C, (Hp + 1) * Wp), "uint8" if unsigned else "int8", name="qx")
    elif packed_input:
        qx = te.placeholder((N, groups * ((Cg + 3) // 4), Hp, Wp, 4), "uint8", name="qx")
    else:
        qx = te.placeholder((N, C, Hp, Wp), "uint8" if unsigned else "int8", name="qx")
    scale = te.placeholder((O,), "float32", name="scale")
    bias = te.placeholder((O,), "float32", name="bias")
    rh = te.reduce_axis((0, KH), name="rh")
    rw = te.reduce_axis((0, KW), name="rw")
    full_rows = bool(full_rows) and layout == "OIHWo" and ob == 1 and sw > 1 and KW > 1 and not pair_cols
    if layout == "OIHWo":
        wl = te.placeholder((O // ob, Cg, KH, KW, ob), "int8", name="w_l")
        rc = te.reduce_axis((0, Cg), name="rc")
        if flat_plane:
            acc = te.compute(
                (N, O // ob, OH * Wp, ob),
                lambda n, oo, p, oi: te.sum(
                    qx[n, (oo // bpg) * Cg + rc, p + rh * dh * Wp + rw * dw].astype("int32")
                    * wl[oo, rc, rh, rw, oi].astype("int32"),
                    axis=[rc, rh, rw],
                ),
                name="acc",
            )
        elif pair_cols:
            def tap(n, c, h, ow, rw):
                col = rw * dw
                word = qx[n, c, h, ow + col // 2].astype("int32")
                if unsigned:
                    return tvm.tirx.bitwise_and(tvm.tirx.shift_right(word, (col % 2) * 8), _i32(255))
                # signed codes: the byte moved to the top, then an arithmetic shift sign-extends it
                return tvm.tirx.shift_right(tvm.tirx.shift_left(word, _i32(24) - (col % 2) * 8), _i32(24))

            acc = te.compute(
                (N, O // ob, OH, OW, ob),
                lambda n, oo, oh, ow, oi: te.sum(
                    tap(n, (oo // bpg) * Cg + rc, oh * sh + rh * dh, ow, rw) * wl[oo, rc, rh, rw, oi].astype("int32"),
                    axis=[rc, rh, rw],
                ),
                name="acc",
            )
        elif full_rows:
            acc = te.compute(
                (N, O // ob, OH, (OW - 1) * sw + 1, ob),
                lambda n, oo, oh, w_, oi: te.sum(
                    qx[n, (oo // bpg) * Cg + rc, oh * sh + rh * dh, w_ + rw * dw]
                    .astype("int32") * wl[oo, rc, rh, rw, oi].astype("int32"),
                    axis=[rc, rh, rw],
                ),
                name="acc",
            )
        else:
            acc = te.compute(
                (N, O // ob, OH, OW, ob),
                lambda n, oo, oh, ow, oi: te.sum(
                    qx[n, (oo // bpg) * Cg + rc, oh * sh + rh * dh, ow * sw + rw * dw]
                    .astype("int32") * wl[oo, rc, rh, rw, oi].astype("int32"),
                    axis=[rc, rh, rw],
                ),
                name="acc",
            )
        offset = None
    else:
        # VNNI layout: activations repacked to [N, groups*CB, Hp, Wp, 4] uint8 (4 channels per
        # 32-bit lane; signed codes get +128 and the accumulator -128 * sum(w) per o).
        CB = (Cg + 3) // 4
        wl = te.placeholder((O // ob, CB, KH, KW, ob, 4), "int8", name="w_l")

        def repack(n, b, h, w_, j):
            ci = (b % CB) * 4 + j
            v = qx[n, (b // CB) * Cg + ci, h, w_]
            v = v if unsigned else (v.astype("int32") + 128).astype("uint8")
            if Cg % 4 == 0:
                return v
            return tvm.tirx.if_then_else(ci < Cg, v, tvm.tirx.const(0, "uint8"))

        xr = qx if packed_input else te.compute((N, groups * CB, Hp, Wp, 4), repack, name="x_r")
        rb = te.reduce_axis((0, CB), name="rb")
        rj = te.reduce_axis((0, 4), name="rj")
        if unsigned:
            offset = None
        else:
            # signed: acc = sum((x + 128) * w) - 128 * sum(w), the correction added in the
            # epilogue (note: te.create_prim_func silently ignores a te.sum(init=tensor))
            sb = te.reduce_axis((0, CB), name="sb")
            sh_ = te.reduce_axis((0, KH), name="sh")
            sw_ = te.reduce_axis((0, KW), name="sw")
            sj = te.reduce_axis((0, 4), name="sj")
            wsum = te.compute(
                (O // ob, ob),
                lambda oo, oi: te.sum(wl[oo, sb, sh_, sw_, oi, sj].astype("int32")
                                      * tvm.tirx.const(-128, "int32"),
                                      axis=[sb, sh_, sw_, sj]),
                name="w_sum")  # = -128 * sum(w)
            offset = wsum
        if spatial_lanes:
            rb = te.reduce_axis((0, CB), name="rb")
            acc = te.compute(
                (N, O // ob, ob, OH * OW),
                lambda n, oo, oi, p: te.sum(
                    xr[n, rb, p, rj].astype("int32") * wl[oo, rb, 0, 0, oi, rj].astype("int32"),
                    axis=[rb, rj]),
                name="acc",
            )
        else:
            acc = te.compute(
                (N, O // ob, OH, OW, ob),
                lambda n, oo, oh, ow, oi: te.sum(
                    xr[n, (oo // bpg) * CB + rb, oh * sh + rh * dh, ow * sw + rw * dw, rj]
                    .astype("int32") * wl[oo, rb, rh, rw, oi, rj].astype("int32"),
                    axis=[rb, rh, rw, rj],
                ),
                name="acc",
            )

    def acc_at(n, o, oh, ow):
        if spatial_lanes:
            a = acc[n, o // ob, o % ob, oh * OW + ow]
        elif flat_plane:
            a = acc[n, o // ob, oh * Wp + ow, o % ob]
        else:
            a = acc[n, o // ob, oh, ow * sw if full_rows else ow, o % ob]
        if offset is not None:
            a = a + offset[o // ob, o % ob]
        return a

    fence = _no_contract if exact_epilogue else (lambda v: v)
    res = te.placeholder((N, O, OH, OW), "float32", name="res") if residual else None
    if residual and (out != "float" or requant is not None):
        raise ValueError("residual needs out='float' and no requant")
    # a requantizing epilogue clamps the reader's codes instead of the float (`_merge_act_bounds`)
    float_act = None if requant is not None else act
    if out == "float":
        def epilogue(n, o, oh, ow):
            v = _clamp_act(fence(acc_at(n, o, oh, ow).astype("float32") * scale[o]) + bias[o], float_act)
            return v + res[n, o, oh, ow] if residual else v

        y = te.compute((N, O, OH, OW), epilogue, name="y")
    elif out == "acc":
        y = te.compute((N, O, OH, OW), acc_at, name="y")
    else:
        raise ValueError(f"out must be 'float' or 'acc', got {out!r}")
    params = [qx, wl, scale, bias, res, y] if residual else [qx, wl, scale, bias, y]
    rq_attrs = {"residual": True} if residual else {}
    if requant is not None:
        if out != "float":
            raise ValueError("requant needs out='float'")
        y, rq_params, rq_attrs = _requant_output(y, requant, act)
        params = [qx, wl, scale, bias, *rq_params, y]
    func = te.create_prim_func(params)
    return _finish(func, "conv2d_int8", ob=int(ob), groups=int(groups), out=out, **rq_attrs,
                   unsigned=bool(unsigned), layout=layout, strides=[sh, sw], dilation=[dh, dw], in_channels=C,
                   full_rows=full_rows, exact_epilogue=bool(exact_epilogue), packed_input=bool(packed_input),
                   spatial_lanes=bool(spatial_lanes), **({"amx": True} if amx else {}),
                   **({"pair_cols": True, "in_width": Wp} if pair_cols else {}),
                   **({"flat_plane": True, "in_height": Hp, "in_width": Wp} if flat_plane else {}),
                   **_act_attrs(act))


def _requant_output(y, requant: dict, act):
    """The requantizing epilogue of ``conv2d_int8(requant=...)``: ``y`` (the float epilogue, a
    te stage that TVM inlines, before the layer's activation ``act``) mapped through the
    activation and the reader's quantize rule. Returns the output stage, the reader's parameters
    and the attributes that record them."""
    N, O, OH, OW = (int(v) for v in y.shape)
    rq_scale, rq_unsigned = float(requant["scale"]), bool(requant["unsigned"])
    pt, pl, pb, pr = _norm_pad(requant.get("pad", 0))
    L, li = int(requant["num_layers"]), int(requant["layer_index"])
    lo4, hi4, odt = (0, 15, "uint8") if rq_unsigned else (-8, 7, "int8")
    counts = te.placeholder((L,), "int32", name="counts")
    rank = te.placeholder((O,), "int32", name="rank")
    shift = te.placeholder((O,), "int32", name="shift")

    attrs = dict(requant_scale=rq_scale, requant_unsigned=rq_unsigned, requant_pad=[pt, pl, pb, pr],
                 requant_layer_index=li, requant_num_layers=L)
    if requant.get("pack4") is not None:
        # a packed reader (a VNNI conv's input, four channels per word): the quantize kernel's own
        # expressions (`quantize_act(pack4=...)`), on the float epilogue instead of a float map
        groups, Cg = (int(v) for v in requant["pack4"])
        if groups * Cg != O or Cg % 4:
            raise ValueError(f"requant pack4={tuple(requant['pack4'])} must split the conv's {O} channels into "
                             "groups of whole channel quads")

        def int8_code(n, o, h, w):
            return _act_code(y[n, o, h, w], rq_scale, rq_unsigned, act)

        def lowered(n, o, h, w):
            q = int8_code(n, o, h, w)
            return tvm.tirx.Select(rank[o] < counts[li], _lower_expr(q, shift[o], lo4, hi4), q).astype(odt)

        q = _pack4_words(lowered, lambda *i: int8_code(*i).astype(odt), (N, O, OH, OW), groups, Cg,
                         (pt, pl, pb, pr), rq_unsigned, lambda c: rank[c] < counts[li])
        return q, [counts, rank, shift], dict(attrs, requant_pack=[groups, Cg])

    def code(n, o, h, w):
        return _act_code_or_lowered(y[n, o, h, w], rq_scale, rq_unsigned, rank[o] < counts[li], shift[o],
                                    lo4, hi4, act).astype(odt)

    if pt or pl or pb or pr:
        def padded(n, o, h, w):
            inside = tvm.tirx.all(h >= pt, h < OH + pt, w >= pl, w < OW + pl)
            return tvm.tirx.if_then_else(inside, code(n, o, h - pt, w - pl), tvm.tirx.const(0, odt))

        q = te.compute((N, O, OH + pt + pb, OW + pl + pr), padded, name="q")
    else:
        q = te.compute((N, O, OH, OW), code, name="q")
    return q, [counts, rank, shift], attrs


def dense_int8(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    unsigned: bool = False,
    out: str = "float",
    ob: int | None = None,
    exact_epilogue: bool = True,
    act=None,
    residual: bool = False,
) -> tvm.tirx.PrimFunc:
    """INT8 dense. ``w_shape`` is the logical ``(O, C)``.  Params
    ``(qx i8|u8[M,C], w_l i8[O//ob,C,ob], scale f32[O], bias f32[O], y)``, ``y`` f32 ``[M,O]``
    (or int32 accumulator with ``out="acc"``). ``residual=True``: ``res`` f32 ``[M, O]`` before
    ``y`` is added in the epilogue, as in :func:`conv2d_int8`."""
    M, C = (int(v) for v in x_shape)
    O, C2 = (int(v) for v in w_shape)
    assert C == C2
    ob = choose_ob(O, 1) if ob is None else int(ob)
    assert O % ob == 0
    qx = te.placeholder((M, C), "uint8" if unsigned else "int8", name="qx")
    wl = te.placeholder((O // ob, C, ob), "int8", name="w_l")
    scale = te.placeholder((O,), "float32", name="scale")
    bias = te.placeholder((O,), "float32", name="bias")
    rc = te.reduce_axis((0, C), name="rc")
    acc = te.compute(
        (M, O // ob, ob),
        lambda m, oo, oi: te.sum(
            qx[m, rc].astype("int32") * wl[oo, rc, oi].astype("int32"), axis=[rc]),
        name="acc",
    )
    fence = _no_contract if exact_epilogue else (lambda v: v)
    if residual and out != "float":
        raise ValueError("residual needs out='float'")
    res = te.placeholder((M, O), "float32", name="res") if residual else None
    if out == "float":
        def epilogue(m, o):
            v = _clamp_act(fence(acc[m, o // ob, o % ob].astype("float32") * scale[o]) + bias[o], act)
            return v + res[m, o] if residual else v

        y = te.compute((M, O), epilogue, name="y")
    elif out == "acc":
        y = te.compute((M, O), lambda m, o: acc[m, o // ob, o % ob], name="y")
    else:
        raise ValueError(f"out must be 'float' or 'acc', got {out!r}")
    func = te.create_prim_func([qx, wl, scale, bias, res, y] if residual else [qx, wl, scale, bias, y])
    return _finish(func, "dense_int8", ob=int(ob), out=out, unsigned=bool(unsigned),
                   exact_epilogue=bool(exact_epilogue), **({"residual": True} if residual else {}), **_act_attrs(act))


# --------------------------------------------------------------------------- variants
def param_shape(func, i):
    """The shape of a PrimFunc's i-th buffer parameter, as ints."""
    p = func.params[i]
    b = func.buffer_map[p] if hasattr(func, "buffer_map") else p
    return [int(v) for v in b.shape]


def rebuild_kernel(func: tvm.tirx.PrimFunc, **overrides) -> tvm.tirx.PrimFunc:
    """The same conv2d_int8 / dense_int8 / lower_weight / NCHW quantize_act kernel (same parameters, read back from its buffers and
    ``flexiq.*`` attributes) with some construction options changed, e.g. ``full_rows=True`` or
    ``act=(0.0, 6.0)``: how a target swaps in an equivalent variant after the rewrite. Attributes
    the original carries beyond its construction options are kept."""
    a = func.attrs
    kind = str(a[KERNEL_ATTR])

    def opt(name, default):
        key = "flexiq." + name
        return a[key] if key in a else default

    act = None
    if "flexiq.act_lo" in a:
        act = tuple(None if str(a[k]) == "none" else float(a[k]) for k in ("flexiq.act_lo", "flexiq.act_hi"))
    if kind in ("conv2d_int8", "dense_int8"):
        common = dict(unsigned=bool(a["flexiq.unsigned"]), out=str(opt("out", "float")), ob=int(a["flexiq.ob"]),
                      exact_epilogue=bool(opt("exact_epilogue", True)), act=act)
    if kind == "conv2d_int8":
        xs, wl = param_shape(func, 0), param_shape(func, 1)
        groups = int(a["flexiq.groups"])
        packed = bool(opt("packed_input", False))
        if packed:   # the logical input shape is not the packed one: the output and attrs hold it
            ys = param_shape(func, len(func.params) - 1)
            if "flexiq.requant_pad" in a:   # the output is the reader's padded codes
                t, l, b, r = (int(v) for v in a["flexiq.requant_pad"])
                ys = ys[:2] + [ys[2] - t - b, ys[3] - l - r]
            xs = [xs[0], int(a["flexiq.in_channels"])] + (ys[2:] if len(xs) == 4 else xs[2:4])
        if bool(opt("pair_cols", False)):   # uint16 words: the attr holds the padded width
            xs = xs[:3] + [int(a["flexiq.in_width"])]
        if bool(opt("flat_plane", False)):  # a flattened plane: the attrs hold its geometry
            xs = xs[:2] + [int(a["flexiq.in_height"]), int(a["flexiq.in_width"])]
        w_shape = (wl[0] * wl[-2 if str(a["flexiq.layout"]) == "OIHWo4i" else -1], xs[1] // groups, wl[2], wl[3])
        args = dict(common, strides=[int(v) for v in opt("strides", [1, 1])],
                    dilation=[int(v) for v in opt("dilation", [1, 1])], groups=groups,
                    layout=str(a["flexiq.layout"]), full_rows=bool(opt("full_rows", False)),
                    packed_input=packed, spatial_lanes=bool(opt("spatial_lanes", False)),
                    pair_cols=bool(opt("pair_cols", False)), flat_plane=bool(opt("flat_plane", False)),
                    residual=bool(opt("residual", False)), amx=bool(opt("amx", False)))
        if "flexiq.requant_scale" in a:
            args["requant"] = dict(scale=float(a["flexiq.requant_scale"]), unsigned=bool(a["flexiq.requant_unsigned"]),
                                   pad=[int(v) for v in a["flexiq.requant_pad"]],
                                   layer_index=int(a["flexiq.requant_layer_index"]),
                                   num_layers=int(a["flexiq.requant_num_layers"]))
            if "flexiq.requant_pack" in a:
                args["requant"]["pack4"] = [int(v) for v in a["flexiq.requant_pack"]]
        args.update(overrides)
        new = conv2d_int8(xs, w_shape, **args)
    elif kind == "dense_int8":
        xs, wl = param_shape(func, 0), param_shape(func, 1)
        args = dict(common, residual=bool(opt("residual", False)))
        args.update(overrides)
        new = dense_int8(xs, (wl[0] * wl[2], wl[1]), **args)
    elif kind == "lower_weight" and not bool(opt("w_prepacked", False)):
        w_shape = param_shape(func, 0)
        args = dict(groups=int(a["flexiq.groups"]), n_groups=param_shape(func, 3)[1],
                    layer_index=int(a["flexiq.layer_index"]), num_layers=param_shape(func, 1)[0],
                    in_channels=param_shape(func, 2)[0] if len(w_shape) == 4 else None,
                    ob=int(a["flexiq.ob"]), layout=None if len(w_shape) == 2 else str(a["flexiq.layout"]))
        args.update(overrides)
        new = lower_weight(w_shape, **args)
    elif kind == "quantize_act" and str(a["flexiq.layout"]) == "NCHW":
        args = dict(pad=[int(v) for v in a["flexiq.pad"]], scale=float(a["flexiq.scale"]),
                    unsigned=bool(a["flexiq.unsigned"]), layer_index=int(a["flexiq.layer_index"]),
                    num_layers=int(a["flexiq.num_layers"]), dynamic=bool(a["flexiq.dynamic"]),
                    n_groups=int(a["flexiq.n_groups"]) if "flexiq.n_groups" in a else None)
        args.update(overrides)
        new = quantize_act(param_shape(func, 0), 1, **args)
    else:
        raise ValueError(f"rebuild_kernel: {kind} kernels ({a.get('flexiq.layout')}) have no variants")
    for k, v in a.items():
        if k not in new.attrs and k not in ("global_symbol", "flexiq.pair_cols", "flexiq.flat_plane",
                                            "flexiq.in_width", "flexiq.in_height"):
            new = new.with_attr(k, v)
    return new
