"""Bit-exact tests of the FlexiQ llvm kernels (flexiq_tvm/schedules) against numpy references.

The references below are written independently of the TE definitions: int64 numpy arithmetic,
the convolution as an explicit per-tap (kh, kw) shifted-slice accumulation (im2col-free loop
formulation), the weight lowering per element from the definition.

Run: python3 -m pytest tests/test_kernels_llvm.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from flexiq_tvm.schedules import compute as fc  # noqa: E402
from flexiq_tvm.schedules import llvm as fl  # noqa: E402

TARGET = fl.default_target()
DEV = tvm.cpu()


# ----------------------------------------------------------------------------- references
def ref_lower(q, e, lo4, hi4):
    q = np.asarray(q, np.int64)
    e = np.asarray(e, np.int64)
    return np.clip((q + ((np.int64(1) << e) >> 1)) >> e, lo4, hi4) << e


def ref_quant(x, s, unsigned):
    lo, hi = (0, 255) if unsigned else (-127, 127)
    v = np.floor(x.astype(np.float32) / np.float32(s) + np.float32(0.5))
    assert v.dtype == np.float32
    return np.clip(v, lo, hi).astype(np.int64)


def ref_quantize_act(x, s, unsigned, rank, shift, k, channel_axis, pad=(0, 0, 0, 0)):
    q = ref_quant(x, s, unsigned)
    lo4, hi4 = (0, 15) if unsigned else (-8, 7)
    bshape = [1] * x.ndim
    bshape[channel_axis] = -1
    low = (rank < k).reshape(bshape)
    e = shift.reshape(bshape)
    q = np.where(low, ref_lower(q, e, lo4, hi4), q)
    if x.ndim == 4:
        t, l, b, r = pad
        q = np.pad(q, ((0, 0), (0, 0), (t, b), (l, r)))
    return q


def ref_lower_weight(w, rank, wshift, k, groups):
    """Per-element definition; returns the LOGICAL-layout lowered weight (int64)."""
    w = w.astype(np.int64)
    out = w.copy()
    O = w.shape[0]
    Cg = w.shape[1]
    opg = O // groups
    for o in range(O):
        for ci in range(Cg):
            c = (o // opg) * Cg + ci
            r = rank[c]
            if r < k:
                out[o, ci] = ref_lower(w[o, ci], wshift[o, r], -8, 7)
    return out


def ref_conv_acc(qxp, w, strides, dilation, groups):
    """qxp: padded int activations [N,C,Hp,Wp]; w logical [O,Cg,KH,KW]; int64 accumulator."""
    qxp = qxp.astype(np.int64)
    w = w.astype(np.int64)
    N, C, Hp, Wp = qxp.shape
    O, Cg, KH, KW = w.shape
    sh, sw = strides
    dh, dw = dilation
    OH = (Hp - dh * (KH - 1) - 1) // sh + 1
    OW = (Wp - dw * (KW - 1) - 1) // sw + 1
    opg = O // groups
    acc = np.zeros((N, O, OH, OW), np.int64)
    for g in range(groups):
        xg = qxp[:, g * Cg:(g + 1) * Cg]
        wg = w[g * opg:(g + 1) * opg]
        for kh in range(KH):
            for kw in range(KW):
                patch = xg[:, :, kh * dh: kh * dh + sh * (OH - 1) + 1: sh,
                           kw * dw: kw * dw + sw * (OW - 1) + 1: sw]  # [N,Cg,OH,OW]
                acc[:, g * opg:(g + 1) * opg] += np.einsum(
                    "nchw,oc->nohw", patch, wg[:, :, kh, kw])
    return acc


def blocked(wlog, ob, layout="OIHWo"):
    """Logical [O, ...] -> "OIHWo" [O//ob, ..., ob] or "OIHWo4i" [O//ob, ceil(Cg/4), KH, KW,
    ob, 4] (input channels zero-padded to a multiple of 4)."""
    O = wlog.shape[0]
    if layout == "OIHWo4i":
        Cg = wlog.shape[1]
        CB = -(-Cg // 4)
        wp = np.zeros((O, CB * 4) + wlog.shape[2:], wlog.dtype)
        wp[:, :Cg] = wlog
        r = wp.reshape((O // ob, ob, CB, 4) + wlog.shape[2:])  # oo, oi, cb, j, kh, kw
        return r.transpose(0, 2, 4, 5, 1, 3)
    r = wlog.reshape((O // ob, ob) + wlog.shape[1:])
    return np.moveaxis(r, 1, -1)


# ----------------------------------------------------------------------------- helpers
_CACHE = {}


def build(func, name):
    return fl.build(func, name=name, target=TARGET)[name]


def run(f, args, out_shape, out_dtype):
    targs = [tvm.runtime.tensor(a) for a in args]
    out = tvm.runtime.empty(out_shape, out_dtype)
    f(*targs, out)
    return out.numpy()


def make_rank(rng, C, n_groups):
    gs = -(-C // n_groups)
    r = (rng.permutation(C) // gs).astype(np.int32)
    return r


def k_values(rng, n_groups):
    ks = {0, n_groups}
    if n_groups > 1:
        ks.add(int(rng.integers(1, n_groups)))
    return sorted(ks)


def rand_x(rng, shape, s, unsigned):
    # spans beyond the clip range, plus exact .5 ties
    lim = 140 if not unsigned else 270
    v = rng.uniform(-lim if not unsigned else -10, lim, size=shape).astype(np.float32) * np.float32(s)
    ties = (rng.integers(-120, 120, size=shape) + 0.5).astype(np.float32) * np.float32(s)
    m = rng.random(shape) < 0.1
    return np.where(m, ties, v).astype(np.float32)


# ----------------------------------------------------------------------------- conv grid
# (N, C, H, W, O, KH, KW, stride, pad, dilation, groups, unsigned)
CONV_CASES = [
    (1, 16, 9, 9, 16, 3, 3, 1, 1, 1, 1, False),
    (3, 8, 7, 10, 24, 3, 3, 2, 1, 1, 1, True),
    (1, 16, 8, 8, 32, 1, 1, 2, 0, 1, 1, False),
    (3, 12, 9, 8, 8, 3, 3, 1, 0, 2, 1, True),
    (1, 16, 10, 10, 16, 3, 3, 1, 1, 1, 2, False),
    (3, 12, 6, 7, 6, 3, 3, 2, 1, 1, 2, True),     # groups=2, O//groups=3 (odd block)
    (1, 16, 11, 11, 16, 3, 3, 1, 1, 1, 16, True),  # depthwise
    (3, 8, 9, 9, 8, 3, 3, 2, 1, 1, 8, False),      # depthwise stride 2
    (1, 8, 12, 12, 8, 3, 3, 1, 2, 2, 8, False),    # depthwise dilation 2 pad 2
    (1, 1, 10, 10, 16, 3, 3, 1, 1, 1, 1, False),   # first layer C=1
    (3, 20, 5, 5, 10, 1, 1, 1, 0, 1, 1, True),
    (1, 4, 6, 6, 16, 3, 3, 1, 1, 1, 1, True),
    (3, 6, 7, 7, 16, 3, 3, 1, 1, 1, 1, False),     # VNNI layout, Cg % 4 != 0 (zero-filled)
    (1, 10, 6, 6, 16, 3, 3, 2, 1, 1, 2, True),     # VNNI layout, groups=2, Cg=5, 8 lanes
    (3, 8, 5, 9, 32, 3, 3, 1, 1, 2, 1, False),     # VNNI, dilation 2, ob=16 x 2 blocks
    # big enough for the multi-threaded code paths (conv >= 2M MACs, quantize >= 256k elems)
    (3, 32, 28, 28, 32, 3, 3, 1, 1, 1, 1, False),
    (3, 64, 56, 56, 64, 3, 3, 1, 1, 1, 64, True),
    # stride-2 depthwise as column pairs (uint16 words): even padded width, dilation 2; odd width
    (1, 12, 8, 10, 12, 3, 3, 2, 1, 2, 12, True),
    (2, 16, 7, 7, 16, 3, 3, 2, 0, 1, 16, True),
]


def _rand_case(seed):
    """Extra random conv case from the property grid."""
    rng = np.random.default_rng(1000 + seed)
    groups_kind = rng.choice(["1", "2", "dw"])
    N = int(rng.choice([1, 3]))
    if groups_kind == "dw":
        C = int(rng.choice([4, 8, 12]))
        O, groups = C, C
    elif groups_kind == "2":
        C = int(rng.choice([4, 8, 12]))
        O = int(rng.choice([4, 8, 16]))
        groups = 2
    else:
        C = int(rng.integers(1, 20))
        O = int(rng.choice([5, 8, 16, 32]))
        groups = 1
    K = int(rng.choice([1, 3]))
    s = int(rng.choice([1, 2]))
    p = int(rng.choice([0, 1]))
    d = int(rng.choice([1, 2])) if K == 3 else 1
    H, W = int(rng.integers(5, 13)), int(rng.integers(5, 13))
    return (N, C, H, W, O, K, K, s, p, d, groups, bool(rng.integers(0, 2)))


ALL_CONV = CONV_CASES + [_rand_case(i) for i in range(4)]


@pytest.mark.parametrize("case", ALL_CONV, ids=[f"conv{i}" for i in range(len(ALL_CONV))])
def test_conv_pipeline_bit_exact(case):
    N, C, H, W, O, KH, KW, st, p, d, groups, unsigned = case
    rng = np.random.default_rng(abs(hash(case)) % (2**32))
    Cg = C // groups
    L, li = 3, 1
    n_groups = max(1, min(C, int(rng.integers(1, 5))))
    s_x = float(rng.uniform(0.01, 0.1))
    pad = (p, p, p, p)
    x = rand_x(rng, (N, C, H, W), s_x, unsigned)
    w = rng.integers(-127, 128, size=(O, Cg, KH, KW)).astype(np.int8)
    rank = make_rank(rng, C, n_groups)
    shift = rng.integers(0, 5, size=C).astype(np.int32)
    wshift = rng.integers(0, 5, size=(O, n_groups)).astype(np.int32)
    scale = rng.uniform(1e-4, 1e-2, size=O).astype(np.float32)
    bias = rng.normal(size=O).astype(np.float32)

    fq = fc.quantize_act((N, C, H, W), 1, pad, s_x, unsigned, li, L)
    fw = fc.lower_weight((O, Cg, KH, KW), groups, n_groups, li, L)
    ob = int(fw.attrs["flexiq.ob"])
    layout = str(fw.attrs["flexiq.layout"])
    wl_shape = fc.conv_weight_layout_shape((O, Cg, KH, KW), groups)
    fcv = fc.conv2d_int8((N, C, H + 2 * p, W + 2 * p), (O, Cg, KH, KW), st, d, groups, unsigned,
                         "float")
    fca = fc.conv2d_int8((N, C, H + 2 * p, W + 2 * p), (O, Cg, KH, KW), st, d, groups, unsigned,
                         "acc")
    fwp = fc.lower_weight((O, Cg, KH, KW), groups, n_groups, li, L, w_prepacked=True)
    mq, mw, mc, ma = (build(fq, "q"), build(fw, "wl"), build(fcv, "cf"), build(fca, "ca"))
    mwp = build(fwp, "wlp")
    # the llvm target's variants (targets/llvm.py prepare): the activation folded into the
    # epilogue, and strided depthwise kernels computed over full rows; read back from the kernel
    act = (0.0, 6.0) if unsigned else (-1.5, None)
    fvar = fc.rebuild_kernel(fcv, full_rows=True, act=act)
    assert bool(fvar.attrs["flexiq.full_rows"]) == (groups == C == O and st > 1 and KW > 1)
    mvar = build(fvar, "cv")
    # stride 2 over an "OIHWo" weight: the input read as uint16 column pairs (the quantize kernel
    # pads an odd row with one zero column); any other conv keeps its form
    fpair = fc.rebuild_kernel(fcv, pair_cols=True, act=act)
    paired = bool(fpair.attrs.get("flexiq.pair_cols", False))
    assert paired == (layout == "OIHWo" and st == 2), (layout, st)
    mpair = build(fpair, "cp") if paired else None
    # stride-1 "OIHWo" with ob == 1: over the flattened plane (one more zero row below it)
    fflat = fc.rebuild_kernel(fcv, flat_plane=True, act=act)
    flat = bool(fflat.attrs.get("flexiq.flat_plane", False))
    assert flat == (layout == "OIHWo" and ob == 1 and st == 1), (layout, ob, st)
    mflat = build(fflat, "cfl") if flat else None
    # the residual add folded into the epilogue (passes.fuse_residual): act(y) + res
    mres = build(fc.rebuild_kernel(fcv, residual=True, act=act), "cres")
    w_pre = fc.prepack_weight(w, groups)
    np.testing.assert_array_equal(w_pre, blocked(w, ob, layout))
    qdt = "uint8" if unsigned else "int8"
    Hp, Wp = H + 2 * p, W + 2 * p
    OH = (Hp - d * (KH - 1) - 1) // st + 1
    OW = (Wp - d * (KW - 1) - 1) // st + 1

    for k in k_values(rng, n_groups):
        counts = rng.integers(0, n_groups + 1, size=L).astype(np.int32)
        counts[li] = k
        q = run(mq, [x, counts, rank, shift], (N, C, Hp, Wp), qdt)
        q_ref = ref_quantize_act(x, s_x, unsigned, rank, shift, k, 1, pad)
        np.testing.assert_array_equal(q.astype(np.int64), q_ref, err_msg=f"quantize k={k}")

        wl = run(mw, [w, counts, rank, wshift], wl_shape, "int8")
        wl_ref = ref_lower_weight(w, rank, wshift, k, groups)
        np.testing.assert_array_equal(wl.astype(np.int64), blocked(wl_ref, ob, layout),
                                      err_msg=f"lower_weight k={k}")
        wlp = run(mwp, [w_pre, counts, rank, wshift], wl_shape, "int8")
        np.testing.assert_array_equal(wlp, wl, err_msg=f"lower_weight prepacked k={k}")

        acc_ref = ref_conv_acc(q_ref, wl_ref, (st, st), (d, d), groups)
        assert np.abs(acc_ref).max() < 2**31
        acc = run(ma, [q, wl, scale, bias], (N, O, OH, OW), "int32")
        np.testing.assert_array_equal(acc.astype(np.int64), acc_ref, err_msg=f"conv acc k={k}")

        y = run(mc, [q, wl, scale, bias], (N, O, OH, OW), "float32")
        y_ref = acc_ref.astype(np.float32) * scale[None, :, None, None] + bias[None, :, None, None]
        _check_epilogue(y, y_ref, acc_ref, scale[None, :, None, None], bias[None, :, None, None])
        yv = run(mvar, [q, wl, scale, bias], (N, O, OH, OW), "float32")
        np.testing.assert_array_equal(yv, np.clip(y_ref, act[0], act[1]), err_msg=f"fused activation k={k}")
        if paired:
            q_even = np.zeros((N, C, Hp, Wp + Wp % 2), qdt)
            q_even[..., :Wp] = q
            yp = run(mpair, [q_even.view(np.uint16), wl, scale, bias], (N, O, OH, OW), "float32")
            np.testing.assert_array_equal(yp, np.clip(y_ref, act[0], act[1]), err_msg=f"column pairs k={k}")
        res = rng.standard_normal((N, O, OH, OW)).astype(np.float32)
        yr = run(mres, [q, wl, scale, bias, res], (N, O, OH, OW), "float32")
        np.testing.assert_array_equal(yr, np.clip(y_ref, act[0], act[1]) + res, err_msg=f"residual k={k}")
        if flat:
            q_rows = np.zeros((N, C, Hp + 1, Wp), qdt)
            q_rows[:, :, :Hp] = q
            yf = run(mflat, [q_rows.reshape(N, C, -1), wl, scale, bias], (N, O, OH, OW), "float32")
            np.testing.assert_array_equal(yf, np.clip(y_ref, act[0], act[1]), err_msg=f"flat plane k={k}")


# (N, C, H, W, O, conv input signed?, reader unsigned?, reader pad, spatial lanes?): 1x1 VNNI convs
REQUANT_CASES = [(2, 16, 8, 8, 32, True, True, (1, 1, 1, 1), True), (1, 12, 4, 12, 16, False, False, (0, 0, 0, 0), True),
                 (1, 24, 16, 16, 48, True, True, (1, 1, 1, 2), True),
                 (2, 64, 32, 32, 32, True, True, (1, 1, 1, 1), True),   # >= 2M MACs: threaded
                 (2, 16, 7, 7, 32, True, True, (1, 1, 1, 1), False),    # channel lanes (49 positions)
                 (1, 20, 5, 6, 16, False, False, (0, 1, 0, 1), False),
                 (1, 24, 4, 52, 32, False, True, (1, 1, 1, 1), True),    # rows of 52 (13-lane epilogue vectors)
                 (2, 64, 16, 56, 32, True, False, (0, 0, 0, 0), True),   # rows of 56 (14 lanes), threaded
                 # the activation joins the code clamp (compute._merge_act_bounds): a signed reader after
                 # a ReLU (codes >= 0: the truncating conversion), bounds whose codes are .5 ties, an
                 # activation range above the code range, and one below zero on a signed reader
                 (1, 16, 4, 16, 32, False, False, (0, 0, 0, 0), True, {"act": (0.0, None)}),
                 (1, 16, 4, 16, 32, True, True, (1, 1, 1, 1), True, {"act": (0.125, 0.375), "s_q": 0.25}),
                 (1, 16, 4, 16, 32, True, True, (0, 0, 0, 0), False, {"act": (20.0, None), "s_q": 0.05}),
                 (1, 16, 4, 16, 32, True, False, (0, 1, 0, 1), True, {"act": (-100.0, -3.0)}),
                 (2, 16, 8, 8, 128, True, True, (1, 2, 1, 1), True)]     # 16 channel blocks, asymmetric border


@pytest.mark.parametrize("case", REQUANT_CASES, ids=[f"rq{i}" for i in range(len(REQUANT_CASES))])
def test_conv_requant_epilogue_writes_the_readers_codes(case):
    """compute.conv2d_int8(requant=...) (passes.fuse_requant): the VNNI conv's epilogue writes the
    next layer's INT8 codes, run-time low channels lowered, border zero; checked against numpy's
    conv, epilogue and quantize rule, and against the float kernel followed by quantize_act."""
    N, C, H, W, O, signed_in, unsigned, pad, spatial, *extra = case
    opts = extra[0] if extra else {}
    rng = np.random.default_rng(sum(case[:5]))
    L, li = 3, 2
    n_groups = 4
    s_q = float(rng.uniform(0.02, 0.08))
    s_q = opts.get("s_q", s_q)
    CB = -(-C // 4)
    xb = rng.integers(0, 256, size=(N, CB, H * W, 4)).astype(np.uint8)       # packed input bytes
    xk = xb if spatial else xb.reshape(N, CB, H, W, 4)
    w = rng.integers(-127, 128, size=(O, C, 1, 1)).astype(np.int8)
    scale = rng.uniform(1e-4, 1e-3, size=O).astype(np.float32)
    bias = rng.normal(size=O).astype(np.float32)
    rank = make_rank(rng, O, n_groups)
    shift = rng.integers(0, 5, size=O).astype(np.int32)
    act = opts.get("act", (0.0, 6.0) if unsigned else (-4.0, None))
    geo = dict(unsigned=not signed_in, layout="OIHWo4i", ob=16, packed_input=True, spatial_lanes=spatial, act=act)
    fy = fc.conv2d_int8((N, C, H, W), (O, C, 1, 1), **geo)
    fr = fc.conv2d_int8((N, C, H, W), (O, C, 1, 1), **geo,
                        requant=dict(scale=s_q, unsigned=unsigned, pad=pad, layer_index=li, num_layers=L))
    assert [str(p.name) for p in fr.params] == ["qx", "w_l", "scale", "bias", "counts", "rank", "shift", "q"]
    tvm.ir.assert_structural_equal(fc.rebuild_kernel(fr), fr)      # the variant reads back whole
    fq_ = fc.quantize_act((N, O, H, W), 1, pad, s_q, unsigned, li, L)
    my, mr, mq = build(fy, "y"), build(fr, "r"), build(fq_, "qa")
    # numpy: unpack the bytes (signed codes carry +128), 1x1 conv, epilogue, clip, quantize
    xv = xb.astype(np.int64).transpose(0, 1, 3, 2).reshape(N, CB * 4, H, W)[:, :C] - (128 if signed_in else 0)
    acc = np.einsum("nchw,oc->nohw", xv, w[:, :, 0, 0].astype(np.int64))
    y_ref = acc.astype(np.float32) * scale[None, :, None, None] + bias[None, :, None, None]
    y_ref = np.maximum(y_ref, np.float32(act[0]))
    if act[1] is not None:
        y_ref = np.minimum(y_ref, np.float32(act[1]))
    wl = blocked(w, 16, "OIHWo4i")
    y = run(my, [xk, wl, scale, bias], (N, O, H, W), "float32")
    np.testing.assert_array_equal(y, y_ref)
    t, l, b, r = pad
    qshape = (N, O, H + t + b, W + l + r)
    qdt = "uint8" if unsigned else "int8"
    for k in k_values(rng, n_groups):
        counts = rng.integers(0, n_groups + 1, size=L).astype(np.int32)
        counts[li] = k
        q_ref = ref_quantize_act(y_ref, s_q, unsigned, rank, shift, k, 1, pad)
        q = run(mr, [xk, wl, scale, bias, counts, rank, shift], qshape, qdt)
        np.testing.assert_array_equal(q.astype(np.int64), q_ref, err_msg=f"requant k={k}")
        np.testing.assert_array_equal(q, run(mq, [y, counts, rank, shift], qshape, qdt), err_msg=f"k={k}")



def ref_pack4(q, groups, unsigned):
    """numpy: codes [N, C, H, W] -> the packed reader's uint32 words [N, groups * ceil(Cg/4), H, W]
    (byte j = channel 4 * cb + j of its group, +128 when signed; channels past Cg repeat the last)."""
    N, C, H, W = q.shape
    Cg = C // groups
    CB = -(-Cg // 4)
    out = np.zeros((N, groups * CB, H, W), np.uint64)
    for g in range(groups):
        for cb in range(CB):
            for j in range(4):
                c = g * Cg + min(cb * 4 + j, Cg - 1)
                out[:, g * CB + cb] |= ((q[:, c].astype(np.int64) + (0 if unsigned else 128)).astype(np.uint64) << (8 * j))
    return out.astype(np.uint32)


# (N, C, H, W, stride, form, depthwise input unsigned?, reader unsigned?, reader groups, reader pad)
DW_PACKED_CASES = [(2, 24, 12, 12, 1, "rows", True, True, 1, 0),
                   (1, 40, 14, 14, 1, "flat", True, False, 1, 0),
                   (2, 12, 9, 11, 2, "pairs", False, True, 1, 1),     # a padded reader (a 3x3 VNNI conv)
                   (1, 16, 7, 7, 1, "flat", False, False, 2, (1, 0, 1, 2)),
                   (1, 64, 20, 20, 1, "rows", True, True, 1, 0),      # threaded
                   (1, 16, 10, 10, 1, "rows", True, False, 1, 0, (0.0, None))]   # a signed reader after a ReLU


@pytest.mark.parametrize("case", DW_PACKED_CASES, ids=[f"dwpack{i}" for i in range(len(DW_PACKED_CASES))])
def test_depthwise_requant_writes_packed_words(case):
    """compute.conv2d_int8(requant=dict(pack4=...)) on a depthwise conv (passes.fuse_requant): the
    epilogue writes the next VNNI conv's packed words directly, every form the llvm target uses
    (whole rows, the flattened plane, column pairs at stride 2); checked against numpy's conv,
    epilogue, quantize rule and packing, and against the float kernel followed by the packed
    quantize kernel, at the ratios' low-channel counts."""
    N, C, H, W, st, form, in_unsigned, unsigned, rgroups, rpad, *extra = case
    rng = np.random.default_rng(C * 100 + H)
    L, li, n_groups = 3, 2, 4
    s_q = float(rng.uniform(0.02, 0.08))
    Hp, Wp = H + 2, W + 2
    OH, OW = (Hp - 3) // st + 1, (Wp - 3) // st + 1
    qdt_in = "uint8" if in_unsigned else "int8"
    x = rng.integers(0 if in_unsigned else -127, 256 if in_unsigned else 128, size=(N, C, Hp, Wp)).astype(qdt_in)
    w = rng.integers(-127, 128, size=(C, 1, 3, 3)).astype(np.int8)
    scale = rng.uniform(2e-3, 2e-2, size=C).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    rank = make_rank(rng, C, n_groups)
    shift = rng.integers(0, 5, size=C).astype(np.int32)
    act = extra[0] if extra else (0.0, 6.0) if unsigned else (-4.0, None)
    geo = dict(unsigned=in_unsigned, act=act, pair_cols=form == "pairs", flat_plane=form == "flat")
    fy = fc.conv2d_int8((N, C, Hp, Wp), (C, 1, 3, 3), st, 1, C, **geo)
    rq = dict(scale=s_q, unsigned=unsigned, pad=rpad, layer_index=li, num_layers=L, pack4=(rgroups, C // rgroups))
    fr = fc.conv2d_int8((N, C, Hp, Wp), (C, 1, 3, 3), st, 1, C, **geo, requant=rq)
    assert bool(fr.attrs.get("flexiq.pair_cols", False)) == (form == "pairs")
    assert bool(fr.attrs.get("flexiq.flat_plane", False)) == (form == "flat")
    tvm.ir.assert_structural_equal(fc.rebuild_kernel(fr), fr)      # the variant reads back whole
    fq_ = fc.quantize_act((N, C, OH, OW), 1, rpad, s_q, unsigned, li, L, pack4=(rgroups, C // rgroups))
    my, mr, mq = build(fy, "y"), build(fr, "r"), build(fq_, "qa")
    if form == "pairs":
        xe = np.zeros((N, C, Hp, Wp + Wp % 2), qdt_in)
        xe[..., :Wp] = x
        xk = xe.view(np.uint16)
    elif form == "flat":
        xk = np.concatenate([x, np.zeros((N, C, 1, Wp), qdt_in)], axis=2).reshape(N, C, -1)
    else:
        xk = x
    wl = blocked(w, 1, "OIHWo")
    acc = ref_conv_acc(x, w, (st, st), (1, 1), C)
    y_ref = acc.astype(np.float32) * scale[None, :, None, None] + bias[None, :, None, None]
    y_ref = np.clip(y_ref, np.float32(act[0]), None if act[1] is None else np.float32(act[1]))
    y = run(my, [xk, wl, scale, bias], (N, C, OH, OW), "float32")
    np.testing.assert_array_equal(y, y_ref)
    t, l, b, r = fc._norm_pad(rpad)
    wshape = (N, rgroups * -(-(C // rgroups) // 4), OH + t + b, OW + l + r)
    for k in k_values(rng, n_groups):
        counts = rng.integers(0, n_groups + 1, size=L).astype(np.int32)
        counts[li] = k
        words_ref = ref_pack4(ref_quantize_act(y_ref, s_q, unsigned, rank, shift, k, 1), rgroups, unsigned)
        words_ref = np.pad(words_ref, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=0 if unsigned else 0x80808080)
        words = run(mr, [xk, wl, scale, bias, counts, rank, shift], wshape, "uint32")
        np.testing.assert_array_equal(words, words_ref, err_msg=f"packed requant k={k}")
        np.testing.assert_array_equal(words, run(mq, [y, counts, rank, shift], wshape, "uint32"), err_msg=f"k={k}")
    with pytest.raises(ValueError, match="whole channel quads"):    # a partial quad stays unfused
        fc.conv2d_int8((N, C, Hp, Wp), (C, 1, 3, 3), st, 1, C, **geo, requant=dict(rq, pack4=(C // 2, 2)))

# The float epilogue y = f32(acc) * scale + bias must be BIT-EXACT vs numpy (two roundings):
# compute.py wraps the product in llvm.arithmetic.fence, so LLVM cannot contract it to an FMA.
def _check_epilogue(y, y_ref, acc, scale, bias):
    np.testing.assert_array_equal(y, y_ref, err_msg="float epilogue not bit-exact")


# ----------------------------------------------------------------------------- dense
DENSE_CASES = [(1, 64, 10, False), (5, 64, 10, True), (5, 37, 16, False), (1, 24, 32, True),
               (5, 100, 7, True), (64, 256, 128, False)]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[f"dense{i}" for i in range(len(DENSE_CASES))])
def test_dense_pipeline_bit_exact(case):
    M, C, O, unsigned = case
    rng = np.random.default_rng(7 + M * 1000 + C * 10 + O)
    L, li = 2, 0
    n_groups = int(rng.integers(1, 5))
    s_x = float(rng.uniform(0.01, 0.1))
    x = rand_x(rng, (M, C), s_x, unsigned)
    w = rng.integers(-127, 128, size=(O, C)).astype(np.int8)
    rank = make_rank(rng, C, n_groups)
    shift = rng.integers(0, 5, size=C).astype(np.int32)
    wshift = rng.integers(0, 5, size=(O, n_groups)).astype(np.int32)
    scale = rng.uniform(1e-4, 1e-2, size=O).astype(np.float32)
    bias = rng.normal(size=O).astype(np.float32)
    fq = fc.quantize_act((M, C), 1, 0, s_x, unsigned, li, L)
    fw = fc.lower_weight((O, C), 1, n_groups, li, L)
    ob = int(fw.attrs["flexiq.ob"])
    mq, mw = build(fq, "q"), build(fw, "wl")
    mwp = build(fc.lower_weight((O, C), 1, n_groups, li, L, w_prepacked=True), "wlp")
    mc = build(fc.dense_int8((M, C), (O, C), unsigned, "float"), "df")
    mr = build(fc.rebuild_kernel(fc.dense_int8((M, C), (O, C), unsigned, "float"), act=(0.0, None)), "dr")
    ma = build(fc.dense_int8((M, C), (O, C), unsigned, "acc"), "da")
    mres = build(fc.rebuild_kernel(fc.dense_int8((M, C), (O, C), unsigned, "float"), act=(0.0, None), residual=True),
                 "dres")
    qdt = "uint8" if unsigned else "int8"
    for k in k_values(rng, n_groups):
        counts = np.array([k, 0], np.int32)
        q = run(mq, [x, counts, rank, shift], (M, C), qdt)
        q_ref = ref_quantize_act(x, s_x, unsigned, rank, shift, k, 1)
        np.testing.assert_array_equal(q.astype(np.int64), q_ref)
        wl = run(mw, [w, counts, rank, wshift], (O // ob, C, ob), "int8")
        wl_ref = ref_lower_weight(w, rank, wshift, k, 1)
        np.testing.assert_array_equal(wl.astype(np.int64), blocked(wl_ref, ob))
        wlp = run(mwp, [fc.prepack_weight(w), counts, rank, wshift], (O // ob, C, ob), "int8")
        np.testing.assert_array_equal(wlp, wl)
        acc_ref = q_ref @ wl_ref.T
        acc = run(ma, [q, wl, scale, bias], (M, O), "int32")
        np.testing.assert_array_equal(acc.astype(np.int64), acc_ref)
        y = run(mc, [q, wl, scale, bias], (M, O), "float32")
        y_ref = acc_ref.astype(np.float32) * scale + bias
        _check_epilogue(y, y_ref, acc_ref, scale, bias)
        np.testing.assert_array_equal(run(mr, [q, wl, scale, bias], (M, O), "float32"), np.maximum(y_ref, 0))
        res = rng.standard_normal((M, O)).astype(np.float32)
        np.testing.assert_array_equal(run(mres, [q, wl, scale, bias, res], (M, O), "float32"),
                                      np.maximum(y_ref, 0) + res, err_msg="residual in the epilogue")


# ----------------------------------------------------------------------------- other tests
def test_quantize_asymmetric_pad_and_lower_values():
    """Asymmetric padding, all shifts 0..4, and the exact lower() table."""
    rng = np.random.default_rng(3)
    N, C, H, W = 2, 5, 4, 6
    pad = (0, 1, 2, 0)  # top, left, bottom, right
    for unsigned in (False, True):
        s = 0.05
        x = rand_x(rng, (N, C, H, W), s, unsigned)
        rank = np.arange(C, dtype=np.int32)
        shift = np.arange(C, dtype=np.int32) % 5
        m = build(fc.quantize_act((N, C, H, W), 1, pad, s, unsigned, 0, 1), "q")
        for k in range(C + 1):
            counts = np.array([k], np.int32)
            q = run(m, [x, counts, rank, shift], (N, C, H + 2, W + 1),
                    "uint8" if unsigned else "int8")
            np.testing.assert_array_equal(
                q.astype(np.int64), ref_quantize_act(x, s, unsigned, rank, shift, k, 1, pad))
    # lower() values on the full int8 range, through lower_weight with one channel per group
    O, C = 5, 255
    w = np.tile(np.arange(-127, 128, dtype=np.int8), (O, 1))
    wshift = np.tile(np.arange(O, dtype=np.int32)[:, None], (1, C))
    rank = np.arange(C, dtype=np.int32)
    m = build(fc.lower_weight((O, C), 1, C, 0, 1, ob=1), "wl")
    wl = run(m, [w, np.array([C], np.int32), rank, wshift], (O, C, 1), "int8")[:, :, 0]
    for e in range(5):
        v = np.arange(-127, 128)
        exp = np.clip((v + ((1 << e) >> 1)) >> e, -8, 7) << e
        np.testing.assert_array_equal(wl[e].astype(np.int64), exp)



@pytest.mark.parametrize("unsigned", [False, True])
def test_quantize_rows_lowering_on_every_code(unsigned):
    """The static NCHW rows fold the lowering into per-channel clamp bounds and a mask
    (compute._act_code_or_lowered, an identity that holds only with the right bounds): every
    integer and half-integer quotient from -300 to 300 (past both clip ends, every rounding tie),
    at each shift 0..4, lowered and not, against numpy's code-then-lower."""
    s = 0.05
    v = np.arange(-600, 601, dtype=np.float32) * np.float32(0.5) * np.float32(s)   # quotients -300..300
    C = 5
    x = np.broadcast_to(v, (1, C, 1, v.size)).copy()
    x[0, :, 0, ::7] = np.nextafter(x[0, :, 0, ::7], np.float32(np.inf))               # just past some ties
    rank, shift = np.arange(C, dtype=np.int32), np.arange(C, dtype=np.int32)
    m = build(fc.quantize_act(x.shape, 1, 0, s, unsigned, 0, 1), "q")
    for k in (0, 2, C):
        q = run(m, [x, np.array([k], np.int32), rank, shift], x.shape, "uint8" if unsigned else "int8")
        np.testing.assert_array_equal(q.astype(np.int64), ref_quantize_act(x, s, unsigned, rank, shift, k, 1),
                                      err_msg=f"k={k}")


def test_counts_change_without_rebuild():
    """The same built modules give the right answer for several counts in a row."""
    rng = np.random.default_rng(11)
    N, C, H, W, O = 1, 16, 8, 8, 16
    L, li, n_groups = 4, 2, 4
    s = 0.04
    x = rand_x(rng, (N, C, H, W), s, True)
    w = rng.integers(-127, 128, size=(O, C, 3, 3)).astype(np.int8)
    rank = make_rank(rng, C, n_groups)
    shift = rng.integers(1, 5, size=C).astype(np.int32)
    wshift = rng.integers(1, 5, size=(O, n_groups)).astype(np.int32)
    scale = np.full(O, 1e-3, np.float32)
    bias = np.zeros(O, np.float32)
    mq = build(fc.quantize_act((N, C, H, W), 1, 1, s, True, li, L), "q")
    mw = build(fc.lower_weight((O, C, 3, 3), 1, n_groups, li, L), "wl")
    ma = build(fc.conv2d_int8((N, C, H + 2, W + 2), (O, C, 3, 3), 1, 1, 1, True, "acc"), "ca")
    prev = None
    for k in [0, 2, 4, 1, 0, 3]:
        counts = np.zeros(L, np.int32)
        counts[li] = k
        counts[(li + 1) % L] = n_groups - k  # other layers' counts must not matter
        q = run(mq, [x, counts, rank, shift], (N, C, H + 2, W + 2), "uint8")
        wl = run(mw, [w, counts, rank, wshift], fc.conv_weight_layout_shape((O, C, 3, 3)),
                 "int8")
        acc = run(ma, [q, wl, scale, bias], (N, O, H, W), "int32")
        q_ref = ref_quantize_act(x, s, True, rank, shift, k, 1, (1, 1, 1, 1))
        acc_ref = ref_conv_acc(q_ref, ref_lower_weight(w, rank, wshift, k, 1), (1, 1), (1, 1), 1)
        np.testing.assert_array_equal(acc.astype(np.int64), acc_ref, err_msg=f"k={k}")
        if prev is not None and prev[0] != k:
            assert not np.array_equal(prev[1], acc), "result did not change with counts"
        prev = (k, acc)


def test_fallback_schedule_builds_and_matches():
    rng = np.random.default_rng(5)
    N, C, H, W, O = 1, 8, 6, 6, 8
    q = rng.integers(-127, 128, size=(N, C, H, W)).astype(np.int8)
    w = rng.integers(-127, 128, size=(O, C, 3, 3)).astype(np.int8)
    for layout in ("OIHWo", "OIHWo4i"):
        fcv = fc.conv2d_int8((N, C, H, W), (O, C, 3, 3), 1, 1, 1, False, "acc", layout=layout)
        f = fl.schedule_fallback(fcv).with_attr("global_symbol", "c")
        m = tvm.compile(tvm.IRModule({"c": f}), target=TARGET)["c"]
        ob = int(fcv.attrs["flexiq.ob"])
        acc = run(m, [q, blocked(w, ob, layout), np.ones(O, np.float32),
                      np.zeros(O, np.float32)], (N, O, H - 2, W - 2), "int32")
        np.testing.assert_array_equal(acc.astype(np.int64),
                                      ref_conv_acc(q, w, (1, 1), (1, 1), 1))


def test_generic_llvm_target_without_vnni():
    """A target without AVX-512 VNNI: the OIHWo4i conv falls back to plain vectorization."""
    rng = np.random.default_rng(17)
    tgt = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    assert not fl._has_vnni(tgt)
    N, C, H, W, O = 2, 8, 7, 7, 16
    for unsigned in (False, True):
        f = fc.conv2d_int8((N, C, H + 2, W + 2), (O, C, 3, 3), 1, 1, 1, unsigned, "acc")
        assert str(f.attrs["flexiq.layout"]) == "OIHWo4i"
        m = fl.build(f, name="c", target=tgt)["c"]
        lo, hi = (0, 256) if unsigned else (-127, 128)
        q = rng.integers(lo, hi, size=(N, C, H + 2, W + 2)).astype("uint8" if unsigned else "int8")
        w = rng.integers(-127, 128, size=(O, C, 3, 3)).astype(np.int8)
        acc = run(m, [q, fc.prepack_weight(w), np.ones(O, np.float32), np.zeros(O, np.float32)],
                  (N, O, H, W), "int32")
        np.testing.assert_array_equal(acc.astype(np.int64), ref_conv_acc(q, w, (1, 1), (1, 1), 1))


def test_relax_call_tir_roundtrip():
    """The kernels called from Relax through bb.add_func + R.call_tir, counts as an input."""
    from tvm import relax

    rng = np.random.default_rng(9)
    N, C, H, W, O, L, li, ng = 1, 8, 6, 6, 16, 2, 1, 2
    s = 0.05
    pad = 1
    fq = fl.schedule_llvm(fc.quantize_act((N, C, H, W), 1, pad, s, False, li, L), TARGET)
    fw = fl.schedule_llvm(fc.lower_weight((O, C, 3, 3), 1, ng, li, L), TARGET)
    fcv = fl.schedule_llvm(
        fc.conv2d_int8((N, C, H + 2, W + 2), (O, C, 3, 3), 1, 1, 1, False, "float"), TARGET)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((N, C, H, W), "float32"))
    cv = relax.Var("counts", relax.TensorType((L,), "int32"))
    wv = relax.Var("w", relax.TensorType((O, C, 3, 3), "int8"))
    rv = relax.Var("rank", relax.TensorType((C,), "int32"))
    sv = relax.Var("shift", relax.TensorType((C,), "int32"))
    wsv = relax.Var("wshift", relax.TensorType((O, ng), "int32"))
    scv = relax.Var("scale", relax.TensorType((O,), "float32"))
    bv = relax.Var("bias", relax.TensorType((O,), "float32"))
    with bb.function("main", [xv, cv, wv, rv, sv, wsv, scv, bv]):
        with bb.dataflow():
            gq = bb.add_func(fq, "flexiq_quantize_0")
            gw = bb.add_func(fw, "flexiq_lower_weight_0")
            gc = bb.add_func(fcv, "flexiq_conv_0")
            q = bb.emit(relax.call_tir(gq, [xv, cv, rv, sv],
                                       relax.TensorType((N, C, H + 2, W + 2), "int8")))
            wl = bb.emit(relax.call_tir(gw, [wv, cv, rv, wsv], relax.TensorType(
                fc.conv_weight_layout_shape((O, C, 3, 3)), "int8")))
            y = bb.emit_output(relax.call_tir(gc, [q, wl, scv, bv],
                                              relax.TensorType((N, O, H, W), "float32")))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), target=TARGET)
    vm = relax.VirtualMachine(ex, DEV)
    x = rand_x(rng, (N, C, H, W), s, False)
    w = rng.integers(-127, 128, size=(O, C, 3, 3)).astype(np.int8)
    rank = make_rank(rng, C, ng)
    shift = rng.integers(0, 5, size=C).astype(np.int32)
    wshift = rng.integers(0, 5, size=(O, ng)).astype(np.int32)
    scale = rng.uniform(1e-4, 1e-2, size=O).astype(np.float32)
    bias = rng.normal(size=O).astype(np.float32)
    for k in (0, 1, 2):
        counts = np.array([ng - k, k], np.int32)
        args = [tvm.runtime.tensor(a) for a in (x, counts, w, rank, shift, wshift, scale, bias)]
        y = vm["main"](*args).numpy()
        q_ref = ref_quantize_act(x, s, False, rank, shift, k, 1, (1, 1, 1, 1))
        acc_ref = ref_conv_acc(q_ref, ref_lower_weight(w, rank, wshift, k, 1), (1, 1), (1, 1), 1)
        y_ref = acc_ref.astype(np.float32) * scale[None, :, None, None] + bias[None, :, None, None]
        _check_epilogue(y, y_ref, acc_ref, scale[None, :, None, None], bias[None, :, None, None])


def test_epilogue_without_fence_is_fma_or_exact():
    """exact_epilogue=False (for targets without llvm.arithmetic.fence): LLVM may contract to an
    FMA; every output must then equal either numpy's two-rounding or the one-rounding value."""
    rng = np.random.default_rng(21)
    M, C, O = 7, 64, 32
    qx = rng.integers(-127, 128, size=(M, C)).astype(np.int8)
    w = rng.integers(-127, 128, size=(O, C)).astype(np.int8)
    scale = rng.uniform(1e-4, 1e-2, size=O).astype(np.float32)
    bias = rng.normal(size=O).astype(np.float32)
    ob = fc.choose_ob(O, 1)
    m = build(fc.dense_int8((M, C), (O, C), False, "float", exact_epilogue=False), "d")
    y = run(m, [qx, blocked(w, ob), scale, bias], (M, O), "float32")
    acc = qx.astype(np.int64) @ w.astype(np.int64).T
    y2 = acc.astype(np.float32) * scale + bias
    fma = (acc.astype(np.float32).astype(np.float64) * scale.astype(np.float64)
           + bias.astype(np.float64)).astype(np.float32)
    assert ((y == y2) | (y == fma)).all()


# ----------------------------------------------------------------------------- dynamic extraction
def ref_quantize_act_dynamic(x, s, unsigned, rank, k, channel_axis, pad=(0, 0, 0, 0), offset=None):
    """Dynamic extraction from the definition, sample by sample and group by group with Python
    ints: m = max |code| over the group's channels and every other position of the sample,
    e = max(clamp(bitlen(m) - (4 if unsigned else 3), 0, 4) - offset[c], 0)."""
    q = ref_quant(x, s, unsigned)
    lo4, hi4 = (0, 15) if unsigned else (-8, 7)
    out = q.copy()
    for n in range(x.shape[0]):
        for g in range(k):
            chans = np.flatnonzero(rank == g)
            if chans.size == 0:
                continue
            sel = np.take(q[n], chans, axis=channel_axis - 1)
            e = min(max(int(np.abs(sel).max()).bit_length() - (4 if unsigned else 3), 0), 4)
            idx = [n] + [slice(None)] * (x.ndim - 1)
            for c in chans:
                idx[channel_axis] = c
                ec = max(e - (int(offset[c]) if offset is not None else 0), 0)
                out[tuple(idx)] = ref_lower(q[tuple(idx)], ec, lo4, hi4)
    if x.ndim == 4 and channel_axis == 1:
        t, l, b, r = pad
        out = np.pad(out, ((0, 0), (0, 0), (t, b), (l, r)))
    return out


def _dyn_x(rng, shape, s, unsigned, channel_axis):
    """Per-channel ranges spread over 3 decades so that groups get different shifts."""
    bshape = [1] * len(shape)
    bshape[channel_axis] = shape[channel_axis]
    spread = np.exp(rng.uniform(np.log(0.01), 0, size=bshape)).astype(np.float32)
    spread = spread * np.exp(rng.uniform(np.log(0.05), 0, size=(shape[0],) + (1,) * (len(shape) - 1))
                             ).astype(np.float32)
    return (rand_x(rng, shape, s, unsigned) * spread).astype(np.float32)


# (shape, channel_axis, pad, n_groups)
DYN_CASES = [
    ((1, 6, 5, 7), 1, (1, 0, 2, 1), 3),
    ((3, 12, 6, 5), 1, (1, 1, 1, 1), 4),
    ((3, 8, 4, 4), 1, (0, 0, 0, 0), 8),
    ((1, 24), 1, 0, 3),
    ((3, 40), 1, 0, 5),
    ((3, 4, 16), 2, 0, 4),                  # dense over tokens: per-sample max over all tokens
]


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("case", DYN_CASES, ids=[f"dyn{i}" for i in range(len(DYN_CASES))])
def test_quantize_dynamic_bit_exact(case, unsigned):
    shape, ax, pad, G = case
    rng = np.random.default_rng(hash((case, unsigned)) % 2**32)
    C, N, s = shape[ax], shape[0], 0.05
    tpad = fc._norm_pad(pad)
    L, li = 3, 1
    f = fc.quantize_act(shape, ax, pad, s, unsigned, li, L, dynamic=True, n_groups=G)
    assert int(f.attrs["flexiq.dynamic"]) == 1
    m = build(f, "q")
    oshape = list(shape)
    if len(shape) == 4:
        oshape[2] += tpad[0] + tpad[2]
        oshape[3] += tpad[1] + tpad[3]
    odt = "uint8" if unsigned else "int8"
    rank = make_rank(rng, C, G)
    offset = rng.integers(0, 3, size=C).astype(np.int32)    # dynamic: the shift input is an offset
    x = _dyn_x(rng, shape, s, unsigned, ax)
    for k in k_values(rng, G):
        counts = np.array([G - k, k, 0], np.int32)
        q = run(m, [x, counts, rank, offset], tuple(oshape), odt)
        q_ref = ref_quantize_act_dynamic(x, s, unsigned, rank, k, ax, tpad, offset)
        np.testing.assert_array_equal(q.astype(np.int64), q_ref, err_msg=f"k={k}")
        if N > 1 and k > 0:
            # sample 0's codes do not depend on the rest of the batch
            x2 = x.copy()
            x2[1:] = x2[1:] * np.float32(30) if unsigned else -x2[1:] * np.float32(0.01)
            q2 = run(m, [x2, counts, rank, offset], tuple(oshape), odt)
            np.testing.assert_array_equal(q2[0], q[0])
            np.testing.assert_array_equal(
                q2.astype(np.int64), ref_quantize_act_dynamic(x2, s, unsigned, rank, k, ax, tpad, offset))
    # dynamic differs from static (for some shift table) once everything is lowered
    q_all = run(m, [x, np.array([0, G, 0], np.int32), rank, np.zeros(C, np.int32)], tuple(oshape), odt)
    static = ref_quantize_act(x, s, unsigned, rank, np.zeros(C, np.int32), G, ax, tpad)
    assert not np.array_equal(q_all.astype(np.int64), static)


def test_quantize_dynamic_fallback_schedule_and_multithreaded():
    """schedule_fallback builds the multi-stage function, and the scheduled version above the
    threading threshold (parallel code paths) is bit-exact too."""
    rng = np.random.default_rng(23)
    for shape, ax, pad, sched in [((3, 10, 7, 6), 1, (1, 2, 0, 1), False), ((2, 5, 12), 2, 0, False),
                                  ((3, 32, 58, 58), 1, 1, True), ((2, 512, 256), 2, 0, True)]:
        for unsigned in (False, True):
            C, G, s = shape[ax], 4, 0.05
            f = fc.quantize_act(shape, ax, pad, s, unsigned, 0, 1, dynamic=True, n_groups=G)
            if sched:
                m = build(f, "q")
            else:
                g = fl.schedule_fallback(f).with_attr("global_symbol", "q")
                m = tvm.compile(tvm.IRModule({"q": g}), target=TARGET)["q"]
            tpad = fc._norm_pad(pad)
            oshape = list(shape)
            if len(shape) == 4:
                oshape[2] += tpad[0] + tpad[2]
                oshape[3] += tpad[1] + tpad[3]
            rank = make_rank(rng, C, G)
            x = _dyn_x(rng, shape, s, unsigned, ax)
            k = int(rng.integers(1, G + 1))
            q = run(m, [x, np.array([k], np.int32), rank, np.zeros(C, np.int32)], tuple(oshape),
                    "uint8" if unsigned else "int8")
            np.testing.assert_array_equal(
                q.astype(np.int64), ref_quantize_act_dynamic(x, s, unsigned, rank, k, ax, tpad),
                err_msg=str((shape, unsigned, sched)))
