"""CUDA kernels of the FlexiQ layers: implicit-GEMM conv2d / dense on INT8 and INT4 tensor cores.

Design (the CUDA target, ``targets/cuda.py``, wires these into the Relax module):

* **Channels in lowering order, physically.**  At compile time each layer's input channels are
  permuted into the plan's lowering order and every group is zero-padded to a whole number of
  64-channel K-slices (:func:`tc_layout`).  Padding channels are 0 in both operands, so they add
  nothing: the result is exact for every group size; only the speed suffers when a group is not a
  multiple of 64 (the target therefore asks for ``group_size`` in multiples of 64, see
  ``targets/cuda.py``).  Weights are stored once, INT8, as ``w[O, KH, KW, Kc]``.
* **Activations** are quantized, gathered into that order and zero-padded spatially by one
  elementwise kernel (:func:`quantize_tc`): ``xq[N, Hp, Wp, Kc]`` (NHWC, channels contiguous),
  INT8 codes; nothing in it depends on the ratio.
* **One GEMM kernel per layer** (:func:`gemm_tc`), ``M = N*OH*OW`` output pixels x ``O`` output
  channels, ``K = KH*KW*Kc``.  A warp computes a 16 x 8*NT tile with ``mma.sync``; ``WM`` warps
  per thread block.  The K loop runs group by group (taps inside), and branches per group on the
  run-time count (``g < counts[layer]``, the same branch for every thread: no divergence):

  - 8-bit group: ``mma.sync.m16n8k32`` ``s8.s8`` (``u8.s8`` for unsigned activations) straight on
    the stored INT8 codes, accumulated into ``acc`` (int32).
  - 4-bit group (sm_80/86/89): both operands are derived from the INT8 tensors by the
    strict-subset rounding shift ``clamp((q + ((1 << e) >> 1)) >> e)`` (activation shift ``e_x[g]``,
    weight shift ``e_w[o, g]``), packed two per byte (eight per 32-bit register) and multiplied
    by ``mma.sync.m16n8k64`` ``s4.s4`` (``u4.s4``) into a per-group partial ``part``; after the
    group, each thread adds ``part << (e_w[o, g] + e_x[g])`` to ``acc`` on CUDA cores.
  - sm_90 (Hopper): INT4 ``mma`` is emulated in software by ptxas (seen in SASS: the s4 mma
    becomes ``IMMA.16832.S8.S8`` plus unpacking), so the 4-bit codes go through the INT8 tensor-core
    path instead (``m16n8k32``, codes in bytes) with the same shift-and-accumulate: exact, but
    the ratio buys no speed on Hopper.
  - epilogue fused: ``y = f32(acc) * scale[o] + bias[o]`` with ``__fmul_rn`` / ``__fadd_rn`` (no
    FMA contraction, bit-exact with the numpy reference even under ``--use_fast_math``).
    Activation functions and the next layer's quantization stay in the Relax graph (separate,
    memory-bound kernels).

  Fragments are loaded straight from global memory into registers (no shared-memory staging, no
  ``ldmatrix``, no software pipelining yet): the kernel is correct and uses the tensor cores, but it
  is not a tuned GEMM.

* ``mode="emu"`` builds the *same* kernel text for llvm: thread loops become serial loops, each
  ``mma.sync`` is replaced by a loop nest that decodes the register fragments of all 32 lanes by the
  PTX ISA's fragment layouts.  The tests build it for the CPU and check it bit-exact against
  ``quant/reference.py``: that covers the fragment packing, the nibble packing, the group/shift
  logic and the epilogue of the tensor-core kernel, everything but the hardware ``mma`` itself.

Layers the tensor cores do not suit (depthwise / grouped convs, layers with fewer than 16 input
channels) keep the target-neutral kernels of ``compute.py``, made CUDA-safe by
:func:`cuda_safe_float` and scheduled by dlight: the ratio is applied there on CUDA cores on the
strict-subset INT8 values (exact, no speed change from the ratio).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import tvm
from tvm import te

K4 = 64          # K of one INT4 mma (m16n8k64)
K8 = 32          # K of one INT8 mma (m16n8k32)
SLICE = K4       # groups are padded to multiples of this many channels

__all__ = ["TCLayout", "tc_layout", "prepare_weight", "quantize_tc", "gemm_tc", "gemm_tc_source",
           "cuda_safe_float", "schedule_elementwise", "int4_native", "K4", "K8"]


def int4_native(arch: str) -> bool:
    """INT4 tensor-core mma runs natively on sm_75..sm_89; Hopper (sm_90+) emulates it."""
    digits = "".join(ch for ch in str(arch) if ch.isdigit())
    return 75 <= int(digits or 0) < 90


# --------------------------------------------------------------------------- layout
@dataclass
class TCLayout:
    """Input channels of one layer in lowering order, groups padded to SLICE channels."""
    src: np.ndarray            # (Kc,) int32: source channel of each slot, -1 = zero padding
    offsets: List[int]         # slot offset of each group
    sizes: List[int]           # real channels of each group
    Kc: int

    @property
    def n_groups(self) -> int:
        return len(self.sizes)

    def uniform(self) -> Tuple[int, int]:
        """(number of leading groups of the same padded width, that width)."""
        if self.n_groups == 1:
            return 0, 0
        w0 = _pad(self.sizes[0])
        n = 1
        while n < self.n_groups - 1 and _pad(self.sizes[n]) == w0 and self.sizes[n] == self.sizes[0]:
            n += 1
        return n, w0


def _pad(n: int) -> int:
    return -(-int(n) // SLICE) * SLICE


def tc_layout(rank: np.ndarray) -> TCLayout:
    """From the per-channel group rank (``LayerPlan.rank``): group g's channels (ascending), then
    zeros up to a multiple of SLICE, group after group."""
    rank = np.asarray(rank, np.int64)
    G = int(rank.max()) + 1 if rank.size else 0
    src, offsets, sizes = [], [], []
    for g in range(G):
        ch = np.nonzero(rank == g)[0]
        offsets.append(len(src))
        sizes.append(int(ch.size))
        src.extend(int(c) for c in ch)
        src.extend([-1] * (_pad(ch.size) - ch.size))
    return TCLayout(np.asarray(src, np.int32), offsets, sizes, len(src))


def prepare_weight(w: np.ndarray, layout: TCLayout) -> np.ndarray:
    """INT8 weight (O, C, KH, KW) or (O, C) -> (O, KH, KW, Kc) in lowering order, zero padded."""
    w = np.asarray(w, np.int8)
    if w.ndim == 2:
        w = w[:, :, None, None]
    O, C, KH, KW = w.shape
    out = np.zeros((O, KH, KW, layout.Kc), np.int8)
    valid = layout.src >= 0
    out[:, :, :, valid] = np.transpose(w, (0, 2, 3, 1))[:, :, :, layout.src[valid]]
    return out


# --------------------------------------------------------------------------- float exactness
def _fdiv(a, b, kind):
    return tvm.tirx.call_pure_extern("float32", "__fdiv_rn", a, b) if kind == "cuda" else a / b


def cuda_safe_float(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """Rewrite the float ops of a ``compute.py`` kernel so that CUDA computes them exactly as
    numpy even under TVM's ``nvcc --use_fast_math``: ``llvm.arithmetic.fence(a * b)`` (an
    llvm-only intrinsic that keeps ``a * b + c`` from becoming an FMA) ->
    ``__fadd_rn(0, a * b)`` (never merged into an FMA), ``x[..] / s`` -> ``__fdiv_rn(x[..], s)``
    (IEEE division instead of the approximate one).  Done on the TVMScript text (this TVM has
    no Python TIR mutator); a kernel with an unexpected float division is refused."""
    import re

    text = func.script()
    fence = 'T.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", '
    if fence not in text and " / T.float32(" not in text:
        return func
    text = text.replace(fence, 'T.call_pure_extern("float32", "__fadd_rn", T.float32(0.0), ')
    text = re.sub(r"(\b[A-Za-z_]\w*\[[^\[\]]*\]) / (T\.float32\([^()]*\))",
                  r'T.call_pure_extern("float32", "__fdiv_rn", \1, \2)', text)
    if " / T.float32(" in text or "llvm.arithmetic.fence" in text:
        raise ValueError("cuda_safe_float: unexpected float expression in kernel:\n" + text[:2000])
    new = tvm.script.from_source(text)
    if isinstance(new, tvm.IRModule):
        new = new["main"]
    return new


# --------------------------------------------------------------------------- quantize
def quantize_tc(x_shape: Sequence[int], layout: TCLayout, scale: float, unsigned: bool,
                pad=(0, 0, 0, 0), kind: str = "cuda") -> tvm.tirx.PrimFunc:
    """float32 x (NCHW, or (M, C) for dense) -> xq (N, Hp, Wp, Kc) INT8 codes in lowering order.

    Params ``(x, src i32[Kc], xq)``; same float math as ``compute.quantize_act``
    (``floor(x / s + 0.5)`` clamped), no lowering (the GEMM derives the 4-bit codes)."""
    x_shape = tuple(int(s) for s in x_shape)
    lo, hi, odt = (0, 255, "uint8") if unsigned else (-127, 127, "int8")
    x = te.placeholder(x_shape, "float32", name="x")
    src = te.placeholder((layout.Kc,), "int32", name="src")
    s = tvm.tirx.const(float(np.float32(scale)), "float32")

    def code(v):
        f = _fdiv(v, s, kind)
        f = tvm.tirx.call_pure_extern("float32", "__fadd_rn", f, tvm.tirx.const(0.5, "float32")) \
            if kind == "cuda" else f + tvm.tirx.const(0.5, "float32")
        f = tvm.tirx.floor(f)
        f = tvm.tirx.max(tvm.tirx.min(f, tvm.tirx.const(float(hi), "float32")), tvm.tirx.const(float(lo), "float32"))
        return f.astype("int32").astype(odt)

    zero = tvm.tirx.const(0, odt)
    if len(x_shape) == 4:
        N, C, H, W = x_shape
        pt, pl, pb, pr = pad
        oshape = (N, H + pt + pb, W + pl + pr, layout.Kc)

        def f(n, h, w, k):
            c = src[k]
            ok = tvm.tirx.all(c >= 0, h >= pt, h < H + pt, w >= pl, w < W + pl)
            cc = tvm.tirx.max(c, 0)
            hh = tvm.tirx.max(tvm.tirx.min(h - pt, H - 1), 0)
            ww = tvm.tirx.max(tvm.tirx.min(w - pl, W - 1), 0)
            return tvm.tirx.if_then_else(ok, code(x[n, cc, hh, ww]), zero)
    else:
        M, C = x_shape
        oshape = (M, 1, 1, layout.Kc)

        def f(m, h, w, k):
            c = src[k]
            return tvm.tirx.if_then_else(c >= 0, code(x[m, tvm.tirx.max(c, 0)]), zero)
    xq = te.compute(oshape, f, name="xq")
    func = te.create_prim_func([x, src, xq])
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return func.with_attr("flexiq.kernel", "quantize_tc")


def schedule_elementwise(func: tvm.tirx.PrimFunc, block: str, threads: int = 256) -> tvm.tirx.PrimFunc:
    """All loops of ``block`` fused, split over blockIdx.x / threadIdx.x."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blk = sch.get_sblock(block)
    fused = sch.fuse(*sch.get_loops(blk))
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


# --------------------------------------------------------------------------- GEMM
@dataclass
class GemmShape:
    N: int
    Hp: int
    Wp: int
    O: int
    OH: int
    OW: int
    KH: int = 1
    KW: int = 1
    SH: int = 1
    SW: int = 1
    DH: int = 1
    DW: int = 1
    dense: bool = False

    @property
    def M(self) -> int:
        return self.N * self.OH * self.OW


class _Emitter:
    def __init__(self, emu: bool):
        self.lines: List[str] = []
        self.ind = 1
        self.emu = emu

    def __call__(self, s: str):
        self.lines.append("    " * self.ind + s)

    def block(self, head: str):
        emitter = self

        class _B:
            def __enter__(self):
                emitter(head)
                emitter.ind += 1

            def __exit__(self, *a):
                emitter.ind -= 1
        return _B()

    def lanes(self):
        """A per-lane phase: a loop over the 32 lanes in emu mode, nothing on the GPU (the whole
        body already runs per thread)."""
        emitter = self

        class _L:
            def __enter__(self):
                if emitter.emu:
                    emitter("for lane in range(32):")
                    emitter.ind += 1

            def __exit__(self, *a):
                if emitter.emu:
                    emitter.ind -= 1
        return _L()


def gemm_tc_source(shp: GemmShape, layout: TCLayout, layer_index: int, num_layers: int, unsigned: bool,
                   int4_mma: bool = True, mode: str = "cuda", nt: int = 4, wm: int = 4) -> str:
    """TVMScript text of the mixed INT8/INT4 GEMM (see the module docstring).

    Params ``(xq adt[N,Hp,Wp,Kc], w i8[O,KH,KW,Kc], counts i32[L], ex i32[G], ew i32[O,G],
    scale f32[O], bias f32[O], y)``; ``y`` is f32 ``[N,O,OH,OW]`` (conv) or ``[M,O]`` (dense)."""
    emu = mode == "emu"
    M, O, Kc, G = shp.M, shp.O, layout.Kc, layout.n_groups
    nt = max(1, min(nt, -(-O // 8)))
    wm = max(1, min(wm, -(-M // 16)))
    BM, BN = 16 * wm, 8 * nt
    GX, GY = -(-M // BM), -(-O // BN)
    adt = "uint8" if unsigned else "int8"
    a_ptx8, a_ptx4 = ("uint8", "uint4") if unsigned else ("int8", "int4")
    lo4, hi4 = (0, 15) if unsigned else (-8, 7)
    L = "lane, " if emu else ""        # register-file index prefix
    scope = "global" if emu else "local"
    e = _Emitter(emu)
    yshape = f"({M}, {O})" if shp.dense else f"({shp.N}, {O}, {shp.OH}, {shp.OW})"
    out = ["@T.prim_func",
           f"def gemm(xq: T.Buffer(({shp.N}, {shp.Hp}, {shp.Wp}, {Kc}), \"{adt}\"), "
           f"w: T.Buffer(({O}, {shp.KH}, {shp.KW}, {Kc}), \"int8\"), counts: T.Buffer(({num_layers},), \"int32\"), "
           f"ex: T.Buffer(({G},), \"int32\"), ew: T.Buffer(({O}, {G}), \"int32\"), "
           f"scale: T.Buffer(({O},), \"float32\"), bias: T.Buffer(({O},), \"float32\"), "
           f"y: T.Buffer({yshape}, \"float32\")):"]
    e('T.func_attr({"tirx.noalias": True})')
    if emu:
        e(f"for bx in range({GX}):"); e.ind += 1
        e(f"for by in range({GY}):"); e.ind += 1
        e(f"for ty in range({wm}):"); e.ind += 1
    else:
        e(f"for bx in T.thread_binding({GX}, thread=\"blockIdx.x\"):"); e.ind += 1
        e(f"for by in T.thread_binding({GY}, thread=\"blockIdx.y\"):"); e.ind += 1
        e(f"for ty in T.thread_binding({wm}, thread=\"threadIdx.y\"):"); e.ind += 1
        e("for lane in T.thread_binding(32, thread=\"threadIdx.x\"):"); e.ind += 1
    LS = "32, " if emu else ""
    e(f"acc = T.decl_buffer(({LS}{nt * 4},), \"int32\", scope=\"{scope}\")")
    e(f"part = T.decl_buffer(({LS}{nt * 4},), \"int32\", scope=\"{scope}\")")
    e(f"a8 = T.decl_buffer(({LS}16,), \"{adt}\", scope=\"{scope}\")")
    e(f"b8 = T.decl_buffer(({LS}{nt * 8},), \"int8\", scope=\"{scope}\")")
    if int4_mma:
        e(f"a4 = T.decl_buffer(({LS}4,), \"uint32\", scope=\"{scope}\")")
        e(f"b4 = T.decl_buffer(({LS}{nt * 2},), \"uint32\", scope=\"{scope}\")")

    # index helpers (strings); lane-dependent ones are valid inside a lanes() phase
    def mrow(r):  # clamped GEMM row of tile row r
        return f"T.min(bx * {BM} + ty * 16 + {r}, {M - 1})"

    def a_index(r, k):  # xq index of GEMM row r (tile-relative expr), channel slot k, current tap
        m = mrow(r)
        if shp.dense:
            return f"{m}, 0, 0, {k}"
        OHW = shp.OH * shp.OW
        h = f"({m}) // {shp.OW} % {shp.OH} * {shp.SH} + kh * {shp.DH}"
        w_ = f"({m}) % {shp.OW} * {shp.SW} + kw * {shp.DW}"
        return f"({m}) // {OHW}, {h}, {w_}, {k}"

    tap = "0, 0" if shp.dense else "kh, kw"

    def lower4(v, sh):
        return (f"T.max(T.min(T.shift_right({v} + T.shift_right(T.shift_left(1, {sh}), 1), {sh}), {hi4}), {lo4})")

    def lower4w(v, sh):
        return f"T.max(T.min(T.shift_right({v} + T.shift_right(T.shift_left(1, {sh}), 1), {sh}), 7), -8)"

    def zero(buf, n):
        with e.lanes():
            with e.block(f"for i in range({n}):"):
                e(f"{buf}[{L}i] = 0")

    def mma(kind, accbuf):
        """kind: 's8' (k32, int8 bytes in a8/b8) or 's4' (k64, nibbles in a4/b4)."""
        if not emu:
            for j in range(nt):
                if kind == "s8":
                    e(f"T.evaluate(T.ptx_legacy.mma(\"m16n8k32\", \"row\", \"col\", \"{a_ptx8}\", \"int8\", \"int32\", "
                      f"a8.data, 0, b8.data, {j * 8}, {accbuf}.data, {j * 4}, False))")
                else:
                    e(f"T.evaluate(T.ptx_legacy.mma(\"m16n8k64\", \"row\", \"col\", \"{a_ptx4}\", \"int4\", \"int32\", "
                      f"a4.data, 0, b4.data, {j * 2}, {accbuf}.data, {j * 4}, False))")
            return
        # emulation: decode all lanes' fragments by the PTX ISA layouts (row = lane // 4 (+8),
        # k-column from lane % 4; n-column = lane // 4 for B)
        with e.block("for lane in range(32):"):
            with e.block(f"for j in range({nt}):"):
                with e.block("for c in range(4):"):
                    kk = K8 if kind == "s8" else K4
                    row, col = "(lane // 4 + c // 2 * 8)", "(lane % 4 * 2 + c % 2)"
                    with e.block(f"for k in range({kk}):"):
                        if kind == "s8":
                            av = f"T.Cast(\"int32\", a8[{row} % 8 * 4 + k % 16 // 4, (k // 16 * 2 + {row} // 8) * 4 + k % 4])"
                            bv = f"T.Cast(\"int32\", b8[{col} * 4 + k % 16 // 4, j * 8 + k // 16 * 4 + k % 4])"
                        else:
                            an = (f"T.Cast(\"int32\", T.bitwise_and(T.shift_right(a4[{row} % 8 * 4 + k % 32 // 8, "
                                  f"k // 32 * 2 + {row} // 8], T.Cast(\"uint32\", k % 8 * 4)), T.uint32(15)))")
                            bn = (f"T.Cast(\"int32\", T.bitwise_and(T.shift_right(b4[{col} * 4 + k % 32 // 8, "
                                  "j * 2 + k // 32], T.Cast(\"uint32\", k % 8 * 4)), T.uint32(15)))")
                            av = an if unsigned else f"T.shift_right(T.shift_left({an}, 28), 28)"
                            bv = f"T.shift_right(T.shift_left({bn}, 28), 28)"
                        e(f"{accbuf}[lane, j * 4 + c] = {accbuf}[lane, j * 4 + c] + {av} * {bv}")

    def pack8(koff, gexpr, four_bit):
        """Fragments of one k32 step at channel slot koff (expr): INT8 codes, or (four_bit) the
        4-bit codes of group gexpr in bytes (the sm_90 path)."""
        with e.lanes():
            with e.block("for r in range(4):"):
                k = f"{koff} + r // 2 * 16 + lane % 4 * 4 + v"
                with e.block("for v in T.vectorized(4):" if not (emu or four_bit) else "for v in range(4):"):
                    src = f"xq[{a_index(f'lane // 4 + r % 2 * 8', k)}]"
                    if four_bit:
                        low = lower4(_i32(src), f"ex[{gexpr}]")
                        e(f"a8[{L}r * 4 + v] = T.Cast(\"{adt}\", {low})")
                    else:
                        e(f"a8[{L}r * 4 + v] = {src}")
            with e.block(f"for j in range({nt}):"):
                with e.block("for r in range(2):"):
                    k = f"{koff} + r * 16 + lane % 4 * 4 + v"
                    with e.block("for v in T.vectorized(4):" if not (emu or four_bit) else "for v in range(4):"):
                        ob = f"T.min(by * {BN} + j * 8 + lane // 4, {O - 1})"
                        src = f"w[{ob}, {tap}, {k}]"
                        if four_bit:
                            low = lower4w(_i32(src), f"ew[{ob}, {gexpr}]")
                            e(f"b8[{L}j * 8 + r * 4 + v] = T.Cast(\"int8\", {low})")
                        else:
                            e(f"b8[{L}j * 8 + r * 4 + v] = {src}")

    def pack4(koff, gexpr):
        """Fragments of one k64 step: 4-bit codes, eight per uint32 (element i in bits 4i..4i+3)."""
        with e.lanes():
            with e.block("for r in range(4):"):
                e(f"a4[{L}r] = T.uint32(0)")
                with e.block("for v in T.unroll(8):" if not emu else "for v in range(8):"):
                    k = f"{koff} + r // 2 * 32 + lane % 4 * 8 + v"
                    src = f"T.Cast(\"int32\", xq[{a_index('lane // 4 + r % 2 * 8', k)}])"
                    nib = f"T.bitwise_and({lower4(src, f'ex[{gexpr}]')}, 15)"
                    e(f"a4[{L}r] = T.bitwise_or(a4[{L}r], T.shift_left(T.Cast(\"uint32\", {nib}), T.Cast(\"uint32\", v * 4)))")
            with e.block(f"for j in range({nt}):"):
                with e.block("for r in range(2):"):
                    e(f"b4[{L}j * 2 + r] = T.uint32(0)")
                    with e.block("for v in T.unroll(8):" if not emu else "for v in range(8):"):
                        ob = f"T.min(by * {BN} + j * 8 + lane // 4, {O - 1})"
                        k = f"{koff} + r * 32 + lane % 4 * 8 + v"
                        src = f"T.Cast(\"int32\", w[{ob}, {tap}, {k}])"
                        nib = f"T.bitwise_and({lower4w(src, f'ew[{ob}, {gexpr}]')}, 15)"
                        e(f"b4[{L}j * 2 + r] = T.bitwise_or(b4[{L}j * 2 + r], "
                          f"T.shift_left(T.Cast(\"uint32\", {nib}), T.Cast(\"uint32\", v * 4)))")

    def taps():
        if shp.dense:
            return None
        return [e.block(f"for kh in range({shp.KH}):"), e.block(f"for kw in range({shp.KW}):")]

    def group(gexpr, off, size):
        n8 = -(-size // K8)
        n4 = -(-size // K4)
        with e.block(f"if {gexpr} < counts[{layer_index}]:"):
            zero("part", nt * 4)
            ctx = taps() or []
            for c in ctx:
                c.__enter__()
            if int4_mma:
                with e.block(f"for kt in range({n4}):"):
                    pack4(f"{off} + kt * {K4}", gexpr)
                    mma("s4", "part")
            else:
                with e.block(f"for kt in range({n8}):"):
                    pack8(f"{off} + kt * {K8}", gexpr, True)
                    mma("s8", "part")
            for c in reversed(ctx):
                c.__exit__()
            with e.lanes():
                with e.block(f"for j in range({nt}):"):
                    with e.block("for c in range(4):"):
                        oc = f"T.min(by * {BN} + j * 8 + lane % 4 * 2 + c % 2, {O - 1})"
                        e(f"acc[{L}j * 4 + c] = acc[{L}j * 4 + c] + T.shift_left(part[{L}j * 4 + c], "
                          f"ew[{oc}, {gexpr}] + ex[{gexpr}])")
        with e.block("else:"):
            ctx = taps() or []
            for c in ctx:
                c.__enter__()
            with e.block(f"for kt in range({n8}):"):
                pack8(f"{off} + kt * {K8}", None, False)
                mma("s8", "acc")
            for c in reversed(ctx):
                c.__exit__()

    zero("acc", nt * 4)
    nu, wu = layout.uniform()
    if nu:
        with e.block(f"for g in range({nu}):"):
            group("g", f"g * {wu}", layout.sizes[0])
    for g in range(nu, G):
        group(str(g), str(layout.offsets[g]), layout.sizes[g])

    # epilogue: dequantize + bias, rounded like numpy (no FMA)
    with e.lanes():
        with e.block(f"for j in range({nt}):"):
            with e.block("for c in range(4):"):
                m = "bx * %d + ty * 16 + lane // 4 + c // 2 * 8" % BM
                o = f"by * {BN} + j * 8 + lane % 4 * 2 + c % 2"
                with e.block(f"if {m} < {M} and {o} < {O}:"):
                    a = f"T.Cast(\"float32\", acc[{L}j * 4 + c])"
                    if emu:
                        val = (f"T.call_llvm_pure_intrin(\"float32\", \"llvm.arithmetic.fence\", {a} * scale[{o}])"
                               f" + bias[{o}]")
                    else:
                        val = (f"T.call_pure_extern(\"float32\", \"__fadd_rn\", T.call_pure_extern(\"float32\", "
                               f"\"__fmul_rn\", {a}, scale[{o}]), bias[{o}])")
                    if shp.dense:
                        e(f"y[{m}, {o}] = {val}")
                    else:
                        OHW = shp.OH * shp.OW
                        e(f"y[({m}) // {OHW}, {o}, ({m}) // {shp.OW} % {shp.OH}, ({m}) % {shp.OW}] = {val}")
    return "\n".join(out + e.lines) + "\n"


def _i32(v: str) -> str:
    return 'T.Cast("int32", ' + v + ")"


def gemm_tc(shp: GemmShape, layout: TCLayout, layer_index: int, num_layers: int, unsigned: bool,
            int4_mma: bool = True, mode: str = "cuda", nt: int = 4, wm: int = 4) -> tvm.tirx.PrimFunc:
    src = gemm_tc_source(shp, layout, layer_index, num_layers, unsigned, int4_mma, mode, nt, wm)
    func = tvm.script.from_source(src, extra_vars={"T": _T()})
    if isinstance(func, tvm.IRModule):
        func = func["gemm"]
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return func.with_attr("flexiq.kernel", "gemm_tc").with_attr("tirx.is_scheduled", True)


def _T():
    from tvm.script import tirx as T
    return T
