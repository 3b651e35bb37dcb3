"""llvm (x86, 2 cores) schedules of the FlexiQ layer kernels.

``schedule_llvm(func, target)`` dispatches on the PrimFunc attr ``"flexiq.kernel"`` (see
``compute.py``) and returns a scheduled PrimFunc (parallel + vectorized / VNNI-tensorized).
Functions without the attr are returned unchanged.  ``schedule_fallback(func, target)`` returns a
correct, lightly scheduled version (outer ``parallel`` only).

Strategies:

* ``conv2d_int8``, weight layout ``"OIHWo4i"`` (``O//groups % 8 == 0`` and ``Cg >= 4``; all the
  Fashion-MNIST convs but the first, MobileNet pointwise): the NCHW activation is repacked
  in-kernel to ``[N, C/4, Hp, Wp, 4]`` uint8 (signed codes + 128, corrected by ``-128*sum(w)``
  in the epilogue), and the reduction runs on ``vpdpbusd`` (AVX-512 VNNI, 64 MACs per
  instruction) through our own tensor intrinsic (``x86_intrin.py``).  Tile: ``owt`` output
  columns x ``ob`` (16 or 8) output channels of int32 accumulators; loop nest
  ``(n, o-block, oh) [parallel] -> owo -> cb, kh, kw -> owi (unrolled) -> vpdpbusd``; the float
  epilogue is computed per tile, vectorized along ``ow``.  Without VNNI in the target the same
  loop nest is vectorized over ``oi`` instead.
* ``conv2d_int8``, ``"OIHWo"`` with ``ob > 1``: same tiling with int32 multiply-adds vectorized
  over the ``ob`` output channels (LLVM emits ``vpdpwssd``/``vpmaddwd``).
* depthwise (``ob == 1``): vectorize along the output row
  (``(n, o, oh) [parallel] -> kh, kw (unrolled) -> ow (vectorized)``).
* ``dense_int8``: ``(m, o-block) -> c -> oi (vectorized)``.
* ``quantize_act``: padding split off with ``decompose_padding`` (zero fill + interior) so both
  vectorize; dynamic extraction (``flexiq.dynamic``) adds the code / max stages before it (see
  ``_sched_dynamic_stages``); ``lower_weight``: byte transpose (scalar, input order) + vectorized lowering.

Threads are used only above a size threshold (see ``_PARALLEL_MIN_*``).
"""

from __future__ import annotations

import tvm
from tvm import s_tir

from .compute import KERNEL_ATTR

__all__ = ["default_target", "apply_schedule", "schedule_llvm", "schedule_fallback", "build", "KERNEL_ATTR"]

# Below these sizes a kernel runs single threaded.  Measured on the shared 2-core machine: with
# another process on the second core, a 2-thread split of a 1.8M-MAC conv was 10-25% SLOWER than
# one thread (the join waits for the descheduled worker), 4M+ MACs gained 2x.
_PARALLEL_MIN_WORK = 1 << 18  # elements, elementwise kernels (quantize_act)
_PARALLEL_MIN_MACS = 1 << 21  # multiply-accumulates, conv / dense


def default_target() -> tvm.target.Target:
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})


def _kind(func):
    if func.attrs is None or KERNEL_ATTR not in func.attrs:
        return None
    return str(func.attrs[KERNEL_ATTR])


def _attr(func, name, default=None):
    key = "flexiq." + name
    if func.attrs is None or key not in func.attrs:
        return default
    v = func.attrs[key]
    try:
        return int(v)
    except Exception:  # noqa: BLE001
        return str(v)


def _extent(sch, loop):
    e = sch.get(loop).extent
    if not isinstance(e, tvm.tirx.IntImm):
        e = tvm.sym.Analyzer().simplify(e)
    return int(e)


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _buf_shape(func, name):
    for p in func.params:  # 0.27: buffer params are buffer-typed Vars (no buffer_map)
        b = func.buffer_map[p] if hasattr(func, "buffer_map") else p
        if str(b.name) == name:
            return [int(s) for s in b.shape]
    raise KeyError(name)


# --------------------------------------------------------------------------- schedules
def _tile(sch, loop, inner: int, max_inner: int):
    """Split `loop` into (outer, inner) through `sample_perfect_tile` with the hand-picked `inner`
    as the decision: untuned builds get exactly that split, and tuning (flexiq_tvm.tuning, whose
    search space is `apply_schedule`) samples and mutates the factor."""
    ext = _extent(sch, loop)
    factors = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max(max_inner, inner),
                                      decision=[ext // inner, inner])
    return sch.split(loop, factors)


def _vec_inner(sch, loop, limit=64):
    """Vectorize ``loop`` (splitting off a divisor <= limit when it is longer)."""
    ext = _extent(sch, loop)
    if ext > limit:
        _, loop = sch.split(loop, [None, _largest_divisor(ext, limit)])
    sch.vectorize(loop)


def _sched_channel_last(sch: s_tir.Schedule, blk, par: bool):
    """Elementwise channel-last block [.., C]: outer loops fused (parallel), C vectorized."""
    *outer_loops, c = sch.get_loops(blk)
    Cc = _extent(sch, c)
    if Cc > 64:
        co, c = sch.split(c, [None, _largest_divisor(Cc, 64)])
        outer_loops.append(co)
    if outer_loops:
        outer = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
        if par:
            sch.parallel(outer)
    sch.vectorize(c)


def _sched_dynamic_stages(sch: s_tir.Schedule, func, par: bool):
    """Dynamic extraction (``flexiq.dynamic``): the stages before the output block ``q``.

    ``q0`` (codes) elementwise like ``q``; ``x_max`` (per (n, c) max |code|): NCHW rfactors the
    w axis so the h-reduction runs vectorized along w (``x_max_rf[n, c, w]``), then a short
    scalar max over w; channel-last keeps c innermost and vectorized with the token reduction
    outside. ``g_max`` / ``e_c`` are G x C / C per sample: left scalar."""
    nchw = _attr(func, "layout", "NC") == "NCHW"
    q0 = sch.get_sblock("q0")
    if nchw:
        n, c, h, w = sch.get_loops(q0)
        nc = sch.fuse(n, c)
        if par:
            sch.parallel(nc)
        _vec_inner(sch, sch.fuse(h, w), 64)
    else:
        _sched_channel_last(sch, q0, par)
    xm = sch.get_sblock("x_max")
    loops = sch.get_loops(xm)
    try:
        if nchw:
            n, c, rh, rw = loops
            rf = sch.rfactor(rw, 2)          # x_max_rf[n, c, w] = max_h |q0|
            n1, c1, rh1, rw1 = sch.get_loops(rf)
            nc1 = sch.fuse(n1, c1)
            if par:
                sch.parallel(nc1)
            # vectorize before decompose_reduction (needs the complete reduction block)
            _vec_inner(sch, rw1, 64)
            init = sch.decompose_reduction(rf, rh1)
            sch.vectorize(sch.get_loops(init)[-1])
        elif len(loops) > 2:
            n, c, *rs = loops
            sch.reorder(n, *rs, c)
            sch.vectorize(c)
            init = sch.decompose_reduction(xm, rs[0])
            sch.vectorize(sch.get_loops(init)[-1])
        else:  # [N, C]: elementwise |q0|
            sch.vectorize(loops[-1])
    except Exception:  # noqa: BLE001  (a schedule primitive refused: keep the naive loops)
        pass


def _sched_quantize(sch: s_tir.Schedule, func):
    blk = sch.get_sblock("q")
    total = 1
    for s in _buf_shape(func, "q"):
        total *= s
    par = total >= _PARALLEL_MIN_WORK
    if _attr(func, "dynamic", 0):
        _sched_dynamic_stages(sch, func, par)
    loops = sch.get_loops(blk)
    if len(loops) == 4:  # NCHW padded
        n, c, h, w = loops
        nc = sch.fuse(n, c)
        if par:
            sch.parallel(nc)
        try:
            # if_then_else(inside, quant(x), 0) -> zero fill of the plane + interior block, so
            # that both vectorize (a vector condition would make TVM scalarize the loop)
            fill = sch.decompose_padding(blk, h)
            fh, fw = sch.get_loops(fill)[-2:]
            _vec_inner(sch, sch.fuse(fh, fw), 64)
        except Exception:  # noqa: BLE001  (no padding: nothing to decompose)
            pass
        # packed words: 64 lanes; the static NCHW codes (per-channel clamp bounds and mask,
        # `compute._act_code_or_lowered`) 16: LLVM scalarized that integer tail at 64 (7x slower)
        static_rows = str(_attr(func, "layout", "")) == "NCHW" and not _attr(func, "dynamic", 0)
        _vec_inner(sch, sch.get_loops(blk)[-1], 16 if static_rows else 64)
    else:  # channel-last [.., C]
        _sched_channel_last(sch, blk, par)


def _sched_lower_weight(sch: s_tir.Schedule, func):
    total = 1
    for s in _buf_shape(func, "w_l"):
        total *= s
    layout = _attr(func, "layout", "OIHWo")
    # elementwise and small: threads only pay off for big weights (measured: a 2-thread
    # split of a 37k-element lowering was slower on the shared 2-core machine)
    par = total >= (1 << 20)
    # w_e: (o, c) shift table, small
    we = sch.get_sblock("w_e")
    sch.vectorize(sch.get_loops(we)[-1])
    # w_t: byte transpose; scalar, iterated in the INPUT order (sequential reads). A vectorized
    # version (gathers) measured 3x slower.
    if not _attr(func, "w_prepacked", 0):
        wt = sch.get_sblock("w_t")
        tl = sch.get_loops(wt)
        if layout == "OIHWo4i":
            oo, cb, kh, kw, oi, j = tl
            sch.reorder(oo, oi, cb, j, kh, kw)
        elif layout == "OIHWo":
            oo, ci, kh, kw, oi = tl
            sch.reorder(oo, oi, ci, kh, kw)
        else:  # dense OIo
            oo, c, oi = tl
            sch.reorder(oo, oi, c)
        if par:
            sch.parallel(tl[0])
    # w_l: elementwise lowering, vectorized along the output's inner (oi[, j]) axes
    n_inner = 2 if layout == "OIHWo4i" else 1
    blk = sch.get_sblock("w_l")
    loops = sch.get_loops(blk)
    inner = loops[-n_inner:]
    outer = loops[:-n_inner]
    vin = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    if _extent(sch, vin) == 1 and len(outer) > 2:
        # ob == 1 (depthwise): vectorize over the taps instead
        vin = sch.fuse(*outer[2:], vin)
        outer = outer[:2]
    vo = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if par:
        sch.parallel(vo)
    if _extent(sch, vin) > 1:
        _vec_inner(sch, vin, 64)


def _has_vnni(target) -> bool:
    try:
        from tvm.target import codegen

        tgt = default_target() if target is None else tvm.target.Target(target)
        if str(tgt.kind.name) != "llvm":
            return False
        return bool(codegen.target_has_features(["avx512vnni", "avx512bw"], tgt))
    except Exception:  # noqa: BLE001
        return False


def _sched_conv_vnni(sch: s_tir.Schedule, func, target):
    ob = _attr(func, "ob", 16)
    acc = sch.get_sblock("acc")
    y = _output_block(sch, func)
    n, oo, oh, ow, oi, rb, rh, rw, rj = sch.get_loops(acc)
    OW = _extent(sch, ow)
    N, O, OH, _ = (_extent(sch, l) for l in sch.get_loops(y))
    CB, KH, KW = _extent(sch, rb), _extent(sch, rh), _extent(sch, rw)
    work = N * O * OH * OW * CB * 4 * KH * KW
    par = work >= _PARALLEL_MIN_MACS

    # activation repack [N, G*CB, Hp, Wp, 4] (absent when the quantize kernel wrote it packed)
    if not _attr(func, "packed_input", 0):
        xr = sch.get_sblock("x_r")
        xn, xb, xh, xw, xj = sch.get_loops(xr)
        xo = sch.fuse(xn, xb, xh)
        if par:
            sch.parallel(xo)
        # NOT vectorized: the 4-channel interleave makes TVM emit element-wise gathers (measured
        # 20x slower than this scalar loop, which LLVM turns into plain byte moves)
        sch.unroll(xj)

    # sum of weights (signed activations only)
    try:
        ws = sch.get_sblock("w_sum")
    except Exception:  # noqa: BLE001
        ws = None
    if ws is not None:
        so, si, sb, sh_, sw_, sj = sch.get_loops(ws)
        sch.reorder(so, sb, sh_, sw_, sj, si)
        sch.vectorize(si)
        sch.decompose_reduction(ws, sb)

    # schedule from the output side (the acc tile is computed at y's tile loop; reverse
    # compute-at is impossible because y also reads w_sum, which lives outside the tile loop)
    owt = _largest_divisor(OW, 14 if ob >= 16 else 24)
    yn, yo, yoh, yow = sch.get_loops(y)
    yoo, yoi = sch.split(yo, [None, ob])
    yowo, yowi = _tile(sch, yow, owt, 24)
    sch.reorder(yn, yoo, yoh, yowo, yoi, yowi)
    outer = sch.fuse(yn, yoo, yoh)
    if par:
        sch.parallel(outer)
    sch.vectorize(yowi)
    # preserve_unit_loops: one loop per block var whatever the tile sizes, so the instruction
    # sequence is the same for every sampled decision (MetaSchedule replays this trace)
    sch.compute_at(acc, yowo, preserve_unit_loops=True)
    # (acc stays "global" scope: the intrinsic's buffers are global; after compute-at it is a
    # small per-thread tile that CompactBufferAllocation shrinks and LLVM keeps on the stack)
    L = dict(zip(("n", "oo", "oh", "owi", "oi", "rb", "rh", "rw", "rj"), sch.get_loops(acc)[2:]))
    intrin = None
    if _has_vnni(target) and ob in (8, 16):
        from .x86_intrin import get_intrin

        try:
            intrin = get_intrin(ob, default_target() if target is None else target)
        except RuntimeError:
            intrin = None
    inner = ("oi", "rj") if intrin is not None else ("rj", "oi")
    order = [L[nm] for nm in ("rb", "rh", "rw", "owi") + inner]
    sch.reorder(*order)
    oi = L["oi"]
    if intrin is None:  # no VNNI: int32 multiply-adds vectorized over the output channels
        sch.unroll(L["rj"])
        sch.vectorize(oi)  # (before decompose_reduction: needs a complete reduction block)
    init = sch.decompose_reduction(acc, order[0])
    sch.vectorize(sch.get_loops(init)[-1])
    if intrin is not None:
        sch.tensorize(oi, intrin)
    sch.unroll(L["owi"])
    if KW <= 4:
        sch.unroll(L["rw"])


def _sched_weight_sum(sch):
    try:
        ws = sch.get_sblock("w_sum")
    except Exception:  # noqa: BLE001  (unsigned activations: no correction)
        return
    so, si, sb, sh_, sw_, sj = sch.get_loops(ws)
    sch.reorder(so, sb, sh_, sw_, sj, si)
    sch.vectorize(si)
    sch.decompose_reduction(ws, sb)


def _output_block(sch: s_tir.Schedule, func):
    """The block a conv's tiles are scheduled from: ``y``, or with a requantizing epilogue
    (``compute.conv2d_int8(requant=...)``) ``q`` with the float ``y`` inlined into it and its
    zero border split off as a fill pass of its own (vectorized: a vector condition inside the
    tile would make TVM scalarize it)."""
    y = sch.get_sblock("y")
    if _attr(func, "requant_scale") is None:
        return y
    sch.compute_inline(y)
    q = sch.get_sblock("q")
    if any(int(v) for v in func.attrs["flexiq.requant_pad"]):
        fill = sch.decompose_padding(q, sch.get_loops(q)[0])
        fn, fo, fh, fw = sch.get_loops(fill)
        outer = sch.fuse(fn, fo)
        if _extent(sch, outer) * _extent(sch, fh) * _extent(sch, fw) >= _PARALLEL_MIN_WORK:
            sch.parallel(outer)
        _vec_inner(sch, sch.fuse(fh, fw), 64)
    return q


def _pointwise_start(sch: s_tir.Schedule, func):
    """What the two 1x1 schedules (spatial-lanes VNNI, AMX) start with: the acc block, the block
    the tiles are scheduled from, its extents (N, O, OH, OW), the input-channel quads, whether it
    is worth threads; the weight-sum correction scheduled."""
    acc = sch.get_sblock("acc")
    y = _output_block(sch, func)
    N, O, OH, OW = (_extent(sch, l) for l in sch.get_loops(y))
    CB = _buf_shape(func, "qx")[1]
    par = N * O * OH * OW * CB * 4 >= _PARALLEL_MIN_MACS
    _sched_weight_sum(sch)
    return acc, y, (N, O, OH, OW), CB, par


def _rows_of_16(OH: int, OW: int, positions: int) -> int:
    """Whole output rows per tile: a multiple of 16 positions, about ``positions``, dividing OH
    (a plane of ``OH * OW % 16 == 0``)."""
    import math

    R = 16 // math.gcd(OW, 16)
    rows = R * max(1, positions // (R * OW))
    while OH % rows:
        rows -= R
    return rows


def _sched_conv_spatial(sch: s_tir.Schedule, func, target):
    """Packed 1x1 conv with the accumulator along the output positions (compute.conv2d_int8
    `spatial_lanes`): tile = ob channels x R whole output rows (R * OW a multiple of 16); per
    16 positions, the ob accumulators stay put over the input-channel quads, each quad one
    64-byte activation load feeding ob VNNI instructions with broadcast weights; the epilogue
    then writes whole rows."""
    from .x86_intrin import get_intrin

    ob = _attr(func, "ob", 16)
    acc, y, (N, O, OH, OW), CB, par = _pointwise_start(sch, func)
    rows = _rows_of_16(OH, OW, 128)
    yn, yo, yh, yw = sch.get_loops(y)
    yoo, yoi = sch.split(yo, [None, ob])
    yho, yhi = _tile(sch, yh, rows, max(rows, 16))
    sch.reorder(yn, yoo, yho, yoi, yhi, yw)
    outer = sch.fuse(yn, yoo, yho)
    if par:
        sch.parallel(outer)
    _vec_inner(sch, yw, 16)
    sch.compute_at(acc, outer, preserve_unit_loops=True)     # (a trace independent of the tile size)
    _n, _oo, oi, pl, rb, rj = sch.get_loops(acc)[1:]
    pk, p16 = sch.split(pl, [None, 16])
    sch.reorder(pk, rb, oi, p16, rj)
    init = sch.decompose_reduction(acc, rb)
    _vec_inner(sch, sch.get_loops(init)[-1], 16)
    sch.tensorize(p16, get_intrin("spatial16", default_target() if target is None else target))
    sch.unroll(oi)


def _sched_conv_amx(sch: s_tir.Schedule, func, target):
    """A spatial-lanes 1x1 conv on Intel AMX (``compute.conv2d_int8(amx=True)``): tile = 16 or 32
    output channels x whole output rows (about 256 positions, a multiple of 16, or the whole plane
    when it is not a multiple of 16). One AMX intrinsic call per tile (``x86_amx.get_amx_intrin``:
    the accumulator tiles stay in registers over the whole input-channel reduction) writes the
    tile's accumulators to a small buffer, which the NCHW epilogue then reads row by row,
    vectorized. No sampled choice: tuning measures it once."""
    from .x86_amx import amx_blocking, get_amx_intrin

    acc, y, (N, O, OH, OW), CB, par = _pointwise_start(sch, func)
    orow, n_o, kcb = amx_blocking(O, CB)
    # whole planes when not a multiple of 16 positions (the intrinsic takes the last positions on
    # narrower tiles), else whole rows of about 256 positions
    rows = OH if (OH * OW) % 16 else _rows_of_16(OH, OW, 256)
    P = rows * OW
    n_p = 2 if P % 32 == 0 else 1
    yn, yo, yh, yw = sch.get_loops(y)
    yoo, yoi = sch.split(yo, [None, orow * n_o])
    yho, yhi = sch.split(yh, [None, rows])
    sch.reorder(yn, yoo, yho, yoi, yhi, yw)
    outer = sch.fuse(yn, yoo, yho)
    if par:
        sch.parallel(outer)
    _vec_inner(sch, yw, 16)
    sch.compute_at(acc, outer, preserve_unit_loops=True)
    top = sch.get_loops(acc)[1]
    sch.tensorize(top, get_amx_intrin(orow * n_o, P, CB, orow, kcb, n_p))


def _vector_taps(sch: s_tir.Schedule, acc, pv, rc, rh, rw):
    """The end both depthwise accumulator schedules over a vector of positions share (the flat
    plane, the packed-word epilogue): positions vectorized, the reduction's init split off and
    vectorized, the taps unrolled when there are at most 16 of them."""
    sch.vectorize(pv)       # (before decompose_reduction: needs the complete block)
    init = sch.decompose_reduction(acc, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    if _extent(sch, rh) * _extent(sch, rw) <= 16:
        sch.unroll(rh)
        sch.unroll(rw)


def _sched_conv_packed_requant(sch: s_tir.Schedule, func):
    """A depthwise (``"OIHWo"``, ``ob == 1``) conv whose epilogue writes its reader's packed
    words (``compute.conv2d_int8(requant=dict(pack4=...))``): a word holds four channels, so the
    tile is a channel quad: per (n, quad[, output row]) [parallel], the four channels'
    accumulators (one output row, or the flattened plane with ``flat_plane``) vectorized along
    the positions with the taps unrolled, then the words of that row / plane, vectorized."""
    acc = sch.get_sblock("acc")
    q = _output_block(sch, func)
    n, b, h, w = sch.get_loops(q)
    flat = bool(_attr(func, "flat_plane", 0))
    outer = sch.fuse(n, b) if flat else sch.fuse(n, b, h)
    work = 1
    for l in sch.get_loops(acc):
        work *= _extent(sch, l)
    if work >= _PARALLEL_MIN_MACS:
        sch.parallel(outer)
    _vec_inner(sch, w, 16)     # (at 56 lanes LLVM moved the words' bytes lane by lane)
    sch.compute_at(acc, outer, preserve_unit_loops=True)
    loops = sch.get_loops(acc)
    if flat:                               # (oo, p, oi, rc, rh, rw)
        oo, p, oi, rc, rh, rw = loops[-6:]
        # the plane's span as one vector loop, as the float kernel's schedule ends with (LLVM
        # splits it into registers); a divisor split (6 x 37 lanes at 14x14) spilled every lane
        po, pv = _tile(sch, p, _extent(sch, p), _extent(sch, p))
        sch.reorder(oo, po, oi, rc, rh, rw, pv)
    else:                                  # (oo, oh, ow, oi, rc, rh, rw)
        oo, oh, ow, oi, rc, rh, rw = loops[-7:]
        OW = _extent(sch, ow)
        po, pv = _tile(sch, ow, OW if OW <= 64 else _largest_divisor(OW, 64), 64)
        sch.reorder(oo, oh, po, oi, rc, rh, rw, pv)
    _vector_taps(sch, acc, pv, rc, rh, rw)


def _sched_conv(sch: s_tir.Schedule, func, target=None):
    if _attr(func, "requant_pack") is not None:
        return _sched_conv_packed_requant(sch, func)
    if _attr(func, "amx", 0):
        return _sched_conv_amx(sch, func, target)
    if _attr(func, "spatial_lanes", 0):
        return _sched_conv_spatial(sch, func, target)
    if _attr(func, "layout", "OIHWo") == "OIHWo4i":
        return _sched_conv_vnni(sch, func, target)
    if _attr(func, "flat_plane", 0):
        return _sched_conv_flat(sch, func)
    ob = _attr(func, "ob", 1)
    acc = sch.get_sblock("acc")
    y = sch.get_sblock("y")
    n, oo, oh, ow, oi, rc, rh, rw = sch.get_loops(acc)
    OW = _extent(sch, ow)
    yshape = _buf_shape(func, "y")
    N, O, OH = yshape[0], yshape[1], yshape[2]
    Cg, KH, KW = _extent(sch, rc), _extent(sch, rh), _extent(sch, rw)
    work = N * O * OH * OW * Cg * KH * KW
    if ob > 1:
        owt = _largest_divisor(OW, 8 if ob >= 16 else 16)
        owo, owi = _tile(sch, ow, owt, 16)
        sch.reorder(n, oo, oh, owo, rc, rh, rw, owi, oi)
        outer = sch.fuse(n, oo, oh)
        if work >= _PARALLEL_MIN_MACS:
            sch.parallel(outer)
        sch.reverse_compute_at(y, owo, preserve_unit_loops=True)
        # epilogue: loops (o, ow) under owo -> vectorize ow (contiguous in y)
        sch.vectorize(sch.get_loops(y)[-1])
        sch.unroll(owi)
        if KW <= 4:
            sch.unroll(rw)
        sch.vectorize(oi)
        sch.decompose_reduction(acc, rc)
    elif _attr(func, "full_rows", 0):
        # strided depthwise computed at every input column (compute.conv2d_int8(full_rows=True)):
        # one output row's accumulators (a contiguous int32 row) per (n, o, oh), vectorized
        # along w; the epilogue picks every sw-th column from that cache-resident row
        yn, yo, yoh, yow = sch.get_loops(y)
        outer = sch.fuse(yn, yo, yoh)
        if work >= _PARALLEL_MIN_MACS:
            sch.parallel(outer)
        sch.compute_at(acc, outer)
        w_, *red = [l for l in sch.get_loops(acc)[1:] if _extent(sch, l) > 1]
        rh_rw = red[-2:] if len(red) >= 2 else red
        sch.reorder(*rh_rw, w_)
        _vec_inner(sch, w_, 64)     # (before decompose_reduction: needs the complete block)
        init = sch.decompose_reduction(acc, rh_rw[0])
        _vec_inner(sch, sch.get_loops(init)[-1], 64)
        if KH * KW <= 16:
            for l in rh_rw:
                sch.unroll(l)
    else:
        # depthwise / ob == 1: vectorize along the output row
        V = OW if OW <= 64 else _largest_divisor(OW, 64)
        owo, owv = _tile(sch, ow, V, 64)
        sch.reorder(n, oo, oh, owo, oi, rc, rh, rw, owv)
        outer = sch.fuse(n, oo, oh)
        if work >= _PARALLEL_MIN_MACS:
            sch.parallel(outer)
        sch.reverse_compute_at(y, owo, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(y)[-1])
        if KH * KW <= 16:
            sch.unroll(rh)
            sch.unroll(rw)
        sch.vectorize(owv)
        init = sch.decompose_reduction(acc, rc)
        sch.vectorize(sch.get_loops(init)[-1])


def _sched_conv_flat(sch: s_tir.Schedule, func):
    """Depthwise conv over the flattened padded plane (compute.conv2d_int8 `flat_plane`): per
    (n, channel) [parallel], the plane's accumulators in vectors of up to 64 positions with the taps
    unrolled around each (they stay in registers), then the epilogue reads each output row's
    contiguous span of them."""
    acc = sch.get_sblock("acc")
    y = sch.get_sblock("y")
    N, O, OH, OW = _buf_shape(func, "y")
    n, oo, p, oi, rc, rh, rw = sch.get_loops(acc)
    P, KH, KW = _extent(sch, p), _extent(sch, rh), _extent(sch, rw)
    yn, yo, yoh, yow = sch.get_loops(y)
    outer = sch.fuse(yn, yo)
    if N * O * P * KH * KW >= _PARALLEL_MIN_MACS:
        sch.parallel(outer)
    sch.vectorize(yow)
    sch.compute_at(acc, outer, preserve_unit_loops=True)
    p, oi, rc, rh, rw = sch.get_loops(acc)[-5:]
    po, pv = _tile(sch, p, _largest_divisor(P, 64), 64)
    sch.reorder(po, oi, rc, rh, rw, pv)
    _vector_taps(sch, acc, pv, rc, rh, rw)


def _sched_dense(sch: s_tir.Schedule, func):
    acc = sch.get_sblock("acc")
    y = sch.get_sblock("y")
    m, oo, oi, rc = sch.get_loops(acc)
    M, OO, OB, C = (_extent(sch, l) for l in (m, oo, oi, rc))
    sch.reorder(m, oo, rc, oi)
    outer = sch.fuse(m, oo)
    if M * OO * OB * C >= _PARALLEL_MIN_MACS and M * OO >= 2:
        sch.parallel(outer)
    sch.reverse_compute_at(y, outer)
    sch.vectorize(sch.get_loops(y)[-1])
    sch.vectorize(oi)
    sch.decompose_reduction(acc, rc)


_SCHEDULES = {
    "quantize_act": _sched_quantize,
    "lower_weight": _sched_lower_weight,
    "conv2d_int8": _sched_conv,
    "dense_int8": _sched_dense,
}


def apply_schedule(sch: s_tir.Schedule, target=None) -> bool:
    """Schedule the FlexiQ kernel ``sch.mod["main"]`` in place; False when it is not one.

    The tuning space of a kernel (``flexiq_tvm.tuning``) is this function: choices it makes
    through ``sch.sample_*`` (with the hand-picked default as the decision) are what tuning
    searches."""
    func = sch.mod["main"]
    kind = _kind(func)
    if kind is None or kind not in _SCHEDULES:
        return False
    if kind == "conv2d_int8":
        _sched_conv(sch, func, target)
    else:
        _SCHEDULES[kind](sch, func)
    return True


def schedule_llvm(func: tvm.tirx.PrimFunc, target=None) -> tvm.tirx.PrimFunc:
    """Schedule a FlexiQ kernel for the llvm target (dispatch on ``"flexiq.kernel"``)."""
    sch = s_tir.Schedule(func)
    return sch.mod["main"] if apply_schedule(sch, target) else func


def schedule_fallback(func: tvm.tirx.PrimFunc, target=None) -> tvm.tirx.PrimFunc:
    """Minimal schedule that is always legal: ``parallel`` on the outermost (spatial) loop of the
    output block; on any error the function is returned unchanged (naive loops, still correct).
    The unscheduled compute definitions build as they are, so this is only a speed nicety."""
    kind = _kind(func)
    if kind is None:
        return func
    try:
        sch = s_tir.Schedule(func)
        name = {"quantize_act": "q", "lower_weight": "w_l"}.get(kind, "y")
        loops = sch.get_loops(sch.get_sblock(name))
        if loops:
            sch.parallel(loops[0])
        return sch.mod["main"]
    except Exception:  # noqa: BLE001
        return func


def build(func: tvm.tirx.PrimFunc, name: str = "main", target=None, schedule: bool = True):
    """Schedule (or not) and build one kernel; returns the ``tvm.runtime.Executable``.

    The callable is ``build(...)[name]`` (global_symbol is set to ``name``)."""
    target = default_target() if target is None else target
    f = schedule_llvm(func, target) if schedule else schedule_fallback(func, target)
    f = f.with_attr("global_symbol", name)
    return tvm.compile(tvm.IRModule({name: f}), target=target)
