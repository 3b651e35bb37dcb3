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

  This first kernel (:func:`gemm_tc_source`, ``kernel="direct"``) loads its fragments straight
  from global memory into registers: correct and on the tensor cores, but not a tuned GEMM.

* **The staged kernel** (issue 17, :func:`gemm_tc_staged_source`, ``kernel="staged"``, the
  default): thread-block tiles staged through shared memory by a multi-stage ``cp.async`` pipeline
  (one stage = one tap x 64 channels = one SLICE, so a stage never straddles a group), XOR-swizzled
  64-byte rows (conflict-free ``ldmatrix``), ``ldmatrix.x4`` fragment loads on 16-byte rows (16
  INT8 per row, as CUTLASS feeds IMMA), the 4-bit path deriving nibbles from the same INT8
  registers (a K permutation inside the 64-channel step, identical for both operands), and the
  fused epilogue.  Tile per layer by :func:`choose_tile` (a documented heuristic; the target takes
  explicit tiles, the hook for the auto-tuning database).  Its emulation models ``cp.async`` as a
  copy and ``ldmatrix`` by its lane mapping, so the CPU tests check the swizzle and every fragment
  mapping the kernel relies on.

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

from ..quant.layer import ConvGeometry

K4 = 64          # K of one INT4 mma (m16n8k64)
K8 = 32          # K of one INT8 mma (m16n8k32)
SLICE = K4       # groups are padded to multiples of this many channels

__all__ = ["TCLayout", "tc_layout", "prepare_weight", "quantize_tc", "gemm_tc", "gemm_tc_source",
           "gemm_tc_staged_source", "Tile", "choose_tile", "smem_offset", "SM_COUNT", "KSTEP",
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
def GemmShape(N: int, Hp: int, Wp: int, O: int, OH: int, OW: int, **kw) -> ConvGeometry:  # noqa: N802
    """The GEMM view of a layer over an already padded Hp x Wp input. It is the layer geometry record
    shared with the NPU codegen (quant/layer.py `ConvGeometry`: N, C, H, W, O, OH, OW, KH, KW, SH, SW,
    DH, DW, PT, PL, PB, PR, groups, dense; Hp / Wp / M derived); a layer's own record
    (`LayerSpec.geometry(batch)`, `NPULayer.geometry`) can be passed wherever a GemmShape is."""
    return ConvGeometry.padded(N=N, Hp=Hp, Wp=Wp, O=O, OH=OH, OW=OW, **kw)


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
    out = _gemm_signature(shp, M, O, Kc, G, num_layers, adt)
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
                    src = f"xq[{a_index('lane // 4 + r % 2 * 8', k)}]"
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
                _epilogue_store(e, shp, m, o, f"acc[{L}j * 4 + c]", M, O, emu)
    return "\n".join(out + e.lines) + "\n"


def _gemm_signature(shp: GemmShape, M: int, O: int, Kc: int, G: int, num_layers: int, adt: str) -> List[str]:
    """The PrimFunc header both tensor-core kernels share (the CUDA target binds these buffers)."""
    yshape = f"({M}, {O})" if shp.dense else f"({shp.N}, {O}, {shp.OH}, {shp.OW})"
    return ["@T.prim_func",
            f"def gemm(xq: T.Buffer(({shp.N}, {shp.Hp}, {shp.Wp}, {Kc}), \"{adt}\"), "
            f"w: T.Buffer(({O}, {shp.KH}, {shp.KW}, {Kc}), \"int8\"), counts: T.Buffer(({num_layers},), \"int32\"), "
            f"ex: T.Buffer(({G},), \"int32\"), ew: T.Buffer(({O}, {G}), \"int32\"), "
            f"scale: T.Buffer(({O},), \"float32\"), bias: T.Buffer(({O},), \"float32\"), "
            f"y: T.Buffer({yshape}, \"float32\")):"]


def _epilogue_store(e, shp: GemmShape, m: str, o: str, acc: str, M: int, O: int, emu: bool) -> None:
    """`y[m, o] = f32(acc) * scale[o] + bias[o]` with two roundings and no FMA, like numpy: in
    CUDA through `__fmul_rn` / `__fadd_rn`, in the llvm emulation through an arithmetic fence.
    Shared by both tensor-core kernels so they round identically."""
    with e.block(f"if {m} < {M} and {o} < {O}:"):
        a = f"T.Cast(\"float32\", {acc})"
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


def _i32(v: str) -> str:
    return 'T.Cast("int32", ' + v + ")"


def gemm_tc(shp: GemmShape, layout: TCLayout, layer_index: int, num_layers: int, unsigned: bool,
            int4_mma: bool = True, mode: str = "cuda", nt: int = 4, wm: int = 4, kernel: str = "staged",
            tile: "Tile | None" = None) -> tvm.tirx.PrimFunc:
    """The layer's GEMM as a scheduled PrimFunc.  ``kernel="staged"`` (default): the shared-memory
    pipelined kernel of :func:`gemm_tc_staged_source` with ``tile`` (default :func:`choose_tile`);
    ``kernel="direct"``: the first kernel (fragments straight from global memory, ``nt`` / ``wm``),
    kept as a reference and a fallback."""
    if kernel == "staged":
        src = gemm_tc_staged_source(shp, layout, layer_index, num_layers, unsigned, int4_mma, mode, tile)
    elif kernel == "direct":
        src = gemm_tc_source(shp, layout, layer_index, num_layers, unsigned, int4_mma, mode, nt, wm)
    else:
        raise ValueError(f"gemm_tc: kernel={kernel!r} (use 'staged' or 'direct')")
    func = tvm.script.from_source(src, extra_vars={"T": _T()})
    if isinstance(func, tvm.IRModule):
        func = func["gemm"]
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return func.with_attr("flexiq.kernel", "gemm_tc").with_attr("tirx.is_scheduled", True)


def _T():
    from tvm.script import tirx as T
    return T


# --------------------------------------------------------------------------- staged GEMM (issue 17)
KSTEP = 64       # channels (bytes) of one pipeline stage per row: one SLICE, so a stage lies in one group


@dataclass(frozen=True)
class Tile:
    """Block tile of the staged kernel: ``wm x wn`` warps, each computing ``16*mi x 8*ni``."""
    wm: int = 2
    wn: int = 2
    mi: int = 2
    ni: int = 4
    stages: int = 3

    @property
    def BM(self) -> int:
        return 16 * self.mi * self.wm

    @property
    def BN(self) -> int:
        return 8 * self.ni * self.wn

    @property
    def threads(self) -> int:
        return 32 * self.wm * self.wn

    def smem_bytes(self) -> int:
        return self.stages * (self.BM + self.BN) * KSTEP


# streaming multiprocessors of the reference card per arch (A100, A10, RTX 4090 / L40-class, H100/H200):
# the "one wave" the tile heuristic aims for
SM_COUNT = {"sm_80": 108, "sm_86": 84, "sm_89": 128, "sm_90": 132}


def choose_tile(M: int, O: int, sms: int = 132, stages: int = 3) -> Tile:
    """Per-layer tile heuristic (documented in the module docstring of the staged kernel).

    Warp tile 32 x 32 (``mi=2, ni=4``), shrunk to 16 rows when ``M <= 16`` (dense at batch 1) and
    to ``8 * ceil(O / 8)`` columns when ``O < 32``.  Block shapes are tried from the largest
    (4 x 2 warps = 128 x 64) down to one warp; the first whose grid has at least ``sms`` blocks
    (one wave; the target passes ``SM_COUNT[arch]``, 132 on an H100/H200, 108 on an A100) is
    taken, otherwise the one with the most blocks (small layers: parallelism beats reuse).  Warps beyond the layer's extent are dropped.
    Both the INT8 and the 4-bit path move the same INT8 bytes through shared memory, so the
    ratio does not change the memory tiling and one tile serves every ratio level."""
    mi = 2 if M > 16 else 1
    ni = 4 if O >= 32 else max(1, -(-O // 8))
    cands = []
    for wm, wn in ((4, 2), (2, 2), (2, 1), (1, 2), (1, 1)):
        wm_ = max(1, min(wm, -(-M // (16 * mi))))
        wn_ = max(1, min(wn, -(-O // (8 * ni))))
        t = Tile(wm_, wn_, mi, ni, stages)
        if t not in cands:
            cands.append(t)
    for t in cands:
        if -(-M // t.BM) * -(-O // t.BN) >= sms:
            return t
    return max(cands, key=lambda t: (-(-M // t.BM) * -(-O // t.BN), -t.threads))


def smem_offset(row: int, chunk: int) -> int:
    """Byte offset of 16-byte chunk ``chunk`` (0..3) of tile row ``row`` in one shared stage: the
    XOR swizzle the staged kernel uses (its ``swz`` emits the same expression)."""
    return row * KSTEP + (chunk ^ ((row >> 1) & 3)) * 16


def _u32byte(x: str, v: str, signed: bool) -> str:
    """Byte ``v`` of the uint32 register expression ``x`` as int32 (sign-extended if ``signed``),
    with only well-defined integer operations."""
    b = f"T.Cast(\"int32\", T.bitwise_and(T.shift_right({x}, T.Cast(\"uint32\", ({v}) * 8)), T.uint32(255)))"
    return f"({b} - T.shift_left(T.bitwise_and({b}, 128), 1))" if signed else b


def gemm_tc_staged_source(shp: GemmShape, layout: TCLayout, layer_index: int, num_layers: int, unsigned: bool,
                          int4_mma: bool = True, mode: str = "cuda", tile: "Tile | None" = None) -> str:
    """TVMScript text of the staged mixed INT8/INT4 GEMM (same parameters as :func:`gemm_tc_source`).

    Structure (one thread block = ``tile.wm x tile.wn`` warps, a ``BM x BN`` output tile):

    * K runs in steps of one tap x 64 channels (``S = KH*KW*Kc/64`` steps); 64 channels are one
      SLICE, so every step lies inside one group ``g`` (a per-step branch ``g < counts[layer]``,
      uniform over the block).
    * **cp.async pipeline**: ``tile.stages`` shared-memory stages of ``BM x 64`` activation bytes
      (rows gathered by the implicit-GEMM index from ``xq``, 16-byte ``cp.async.cg``) and
      ``BN x 64`` weight bytes; ``stages - 1`` steps are in flight while one is computed
      (``cp.async.wait_group stages-2`` + one barrier per step).
    * **swizzle**: a 64-byte row holds four 16-byte chunks; chunk ``c`` of row ``r`` is stored at
      ``c ^ ((r >> 1) & 3)``, so the 8 row addresses of one ``ldmatrix`` 8x8 matrix fall in 8
      different 16-byte bank groups (no bank conflicts; unswizzled rows 2 apart would collide).
    * **ldmatrix**: ``ldmatrix.m8n8.x4.b16`` on 16-byte rows = 16 INT8 per row (how CUTLASS feeds
      IMMA): A gets the m16n8k32 fragment of one 32-channel half per x4 (two per step), B the
      fragments of one n8 column block over all 64 channels per x4.
    * **INT8 step**: ``mma.m16n8k32`` on those registers into ``acc``.
    * **4-bit step** (sm_80/86/89): the bytes are lowered by the strict-subset shift and packed to
      nibbles in registers, INT4 register ``r`` taking the two INT8 registers that hold channels
      ``t*4..t*4+3`` and ``16+t*4..`` of a 32-channel half, i.e. the k64 INT4 mma sees the 64
      channels of the step in a permuted order, the *same* permutation for A and B, so the dot
      product is unchanged; ``mma.m16n8k64`` into ``part``, then ``acc += part << (e_w + e_x)``.
      sm_90: the lowered codes stay in bytes and go through ``m16n8k32`` (INT4 mma is emulated on
      Hopper).
    * **epilogue** fused: ``f32(acc) * scale + bias`` (``__fmul_rn`` / ``__fadd_rn``), stored
      straight from the accumulator registers.

    ``mode="emu"``: the same text for llvm, threads as serial loops over per-thread register
    arrays, ``cp.async`` as a plain 16-byte copy, ``ldmatrix`` as the lane -> element mapping the
    PTX ISA defines (thread ``l`` gets bytes ``4*(l%4)..+3`` of the row whose address lane
    ``8*i + l//4`` supplies), each ``mma`` as the fragment-layout decode: the tests check the
    swizzle, the address mapping and the nibble permutation bit-exact on the CPU."""
    emu = mode == "emu"
    M, O, Kc, G = shp.M, shp.O, layout.Kc, layout.n_groups
    t = tile or choose_tile(M, O)
    WM, MI, NI, ST = t.wm, t.mi, t.ni, t.stages
    BM, BN, NTH, NW = t.BM, t.BN, t.threads, t.wm * t.wn
    if ST < 2:
        raise ValueError("staged GEMM needs at least 2 stages")
    GX, GY = -(-M // BM), -(-O // BN)
    NC = Kc // KSTEP
    TAPS = shp.KH * shp.KW
    S = TAPS * NC
    adt = "uint8" if unsigned else "int8"
    a_ptx8, a_ptx4 = ("uint8", "uint4") if unsigned else ("int8", "int4")
    lo4, hi4 = (0, 15) if unsigned else (-8, 7)
    e = _Emitter(emu)
    U = (lambda n: f"range({n})") if emu else (lambda n: f"T.unroll({n})")
    lane, warp = "(tid % 32)", "(tid // 32)"
    wmi, wni = f"({warp} % {WM})", f"({warp} // {WM})"
    scope = "global" if emu else "local"

    def R(buf, i, who="tid"):
        return f"{buf}[{who}, {i}]" if emu else f"{buf}[{i}]"

    class _Threads:
        def __enter__(self):
            if emu:
                e(f"for tid in range({NTH}):")
                e.ind += 1

        def __exit__(self, *a):
            if emu:
                e.ind -= 1

    out = _gemm_signature(shp, M, O, Kc, G, num_layers, adt)
    e('T.func_attr({"tirx.noalias": True})')
    if emu:
        e(f"for bx in range({GX}):"); e.ind += 1
        e(f"for by in range({GY}):"); e.ind += 1
        e(f"sa = T.decl_buffer(({ST * BM * KSTEP},), \"{adt}\", scope=\"global\")")
        e(f"sb = T.decl_buffer(({ST * BN * KSTEP},), \"int8\", scope=\"global\")")
    else:
        e(f"for bx in T.thread_binding({GX}, thread=\"blockIdx.x\"):"); e.ind += 1
        e(f"for by in T.thread_binding({GY}, thread=\"blockIdx.y\"):"); e.ind += 1
        e(f"for tid in T.thread_binding({NTH}, thread=\"threadIdx.x\"):"); e.ind += 1
        e(f"sa = T.alloc_buffer(({ST * BM * KSTEP},), \"{adt}\", scope=\"shared\")")
        e(f"sb = T.alloc_buffer(({ST * BN * KSTEP},), \"int8\", scope=\"shared\")")
    LS = f"{NTH}, " if emu else ""
    NACC = MI * NI * 4
    e(f"acc = T.decl_buffer(({LS}{NACC},), \"int32\", scope=\"{scope}\")")
    e(f"part = T.decl_buffer(({LS}{NACC},), \"int32\", scope=\"{scope}\")")
    e(f"afr = T.decl_buffer(({LS}{MI * 8},), \"uint32\", scope=\"{scope}\")")
    e(f"bfr = T.decl_buffer(({LS}{NI * 4},), \"uint32\", scope=\"{scope}\")")
    if int4_mma:
        e(f"a4 = T.decl_buffer(({LS}{MI * 4},), \"uint32\", scope=\"{scope}\")")
        e(f"b4 = T.decl_buffer(({LS}{NI * 2},), \"uint32\", scope=\"{scope}\")")
    else:
        e(f"ax = T.decl_buffer(({LS}{MI * 8},), \"uint32\", scope=\"{scope}\")")
        e(f"bx8 = T.decl_buffer(({LS}{NI * 4},), \"uint32\", scope=\"{scope}\")")
    e(f"esh = T.decl_buffer(({LS}{NI * 2},), \"int32\", scope=\"{scope}\")")

    # ---- step decoding: step s -> tap (kh, kw), 64-channel chunk c, group g
    def step(sv):
        c = f"({sv}) % {NC}"
        tap = f"({sv}) // {NC}"
        kh, kw = f"{tap} // {shp.KW}", f"{tap} % {shp.KW}"
        chunks = [o // KSTEP for o in layout.offsets]
        widths = [chunks[i + 1] - chunks[i] for i in range(G - 1)]
        if G == 1:
            g = "0"
        elif len(set(widths)) == 1 and NC - chunks[-1] <= widths[0]:
            g = f"T.min({c} // {widths[0]}, {G - 1})"
        else:
            g = " + ".join(f"T.Cast(\"int32\", {c} >= {st})" for st in chunks[1:])
        return kh, kw, c, g

    def a_row_index(m, kh, kw, k):
        if shp.dense:
            return f"{m}, 0, 0, {k}"
        OHW = shp.OH * shp.OW
        h = f"({m}) // {shp.OW} % {shp.OH} * {shp.SH} + ({kh}) * {shp.DH}"
        w_ = f"({m}) % {shp.OW} * {shp.SW} + ({kw}) * {shp.DW}"
        return f"({m}) // {OHW}, {h}, {w_}, {k}"

    def swz(row, ch):
        return f"({row}) * {KSTEP} + T.bitwise_xor({ch}, ({row}) // 2 % 4) * 16"

    def load(sv, stage):
        """All threads issue the 16-byte copies of step ``sv`` into ``stage``."""
        kh, kw, c, _ = step(sv)
        with _Threads():
            for buf, rows, nrows, is_a in (("sa", BM, M, True), ("sb", BN, O, False)):
                nq = rows * 4
                with e.block(f"for it in {U(-(-nq // NTH))}:"):
                    q = f"(it * {NTH} + tid)"
                    guard = nq % NTH != 0
                    if guard:
                        e(f"if {q} < {nq}:")
                        e.ind += 1
                    row, ch = f"{q} // 4", f"{q} % 4"
                    k = f"{c} * {KSTEP} + {ch} * 16"
                    if is_a:
                        gidx = a_row_index(f"T.min(bx * {BM} + {row}, {nrows - 1})", kh, kw, k)
                        srcb = "xq"
                    else:
                        ob = f"T.min(by * {BN} + {row}, {nrows - 1})"
                        gidx = f"{ob}, 0, 0, {k}" if shp.dense else f"{ob}, {kh}, {kw}, {k}"
                        srcb = "w"
                    dst = f"{stage} * {rows * KSTEP} + {swz(row, ch)}"
                    if emu:
                        with e.block("for b in range(16):"):
                            gi = gidx.rsplit(", ", 1)
                            e(f"{buf}[{dst} + b] = {srcb}[{gi[0]}, {gi[1]} + b]")
                    else:
                        e(f"T.ptx.cp.async_.cg.shared.global_(T.address_of({buf}[{dst}]), "
                          f"T.address_of({srcb}[{gidx}]), 16)")
                    if guard:
                        e.ind -= 1
        if not emu:
            e("T.ptx.cp.async_.commit_group()")

    def ldmatrix(buf, dst, doff, addr_of_lane):
        """x4 ldmatrix into registers dst[doff .. doff+3]; addr_of_lane(l) = byte offset in buf."""
        if not emu:
            e(f"T.evaluate(T.ptx_legacy.ldmatrix(False, 4, \".b16\", {dst}.data, {doff}, {buf}.data, "
              f"{addr_of_lane(lane)}))")
            return
        with e.block("for i in range(4):"):
            src = addr_of_lane(f"(i * 8 + {lane} // 4)")
            terms = [f"T.shift_left(T.Cast(\"uint32\", T.bitwise_and(T.Cast(\"int32\", {buf}[{src} + {lane} % 4 * 4 + {b}]), 255)), T.uint32({8 * b}))"
                     for b in range(4)]
            e(f"{R(dst, f'{doff} + i')} = " + " + ".join(terms))

    def mma_emu(kind, abuf, bbuf, accbuf, mi, j, h):
        """One warp-level mma for every warp, by the PTX fragment layouts (registers of lane l of
        warp w at [w * 32 + l, ...])."""
        with e.block(f"for wv in range({NW}):"):
            with e.block("for ln in range(32):"):
                with e.block("for c in range(4):"):
                    row, col = "(ln // 4 + c // 2 * 8)", "(ln % 4 * 2 + c % 2)"
                    if kind == "s8":
                        kk = K8
                        aw = f"wv * 32 + {row} % 8 * 4 + k % 16 // 4"
                        ar = f"{mi} * 8 + {h} * 4 + k // 16 * 2 + {row} // 8"
                        bw = f"wv * 32 + {col} * 4 + k % 16 // 4"
                        br = f"{j} * 4 + {h} * 2 + k // 16"
                        av = _u32byte(f"{abuf}[{aw}, {ar}]", "k % 4", not unsigned)
                        bv = _u32byte(f"{bbuf}[{bw}, {br}]", "k % 4", True)
                    else:
                        kk = K4
                        aw = f"wv * 32 + {row} % 8 * 4 + k % 32 // 8"
                        ar = f"{mi} * 4 + k // 32 * 2 + {row} // 8"
                        bw = f"wv * 32 + {col} * 4 + k % 32 // 8"
                        br = f"{j} * 2 + k // 32"
                        an = (f"T.Cast(\"int32\", T.bitwise_and(T.shift_right({abuf}[{aw}, {ar}], "
                              "T.Cast(\"uint32\", k % 8 * 4)), T.uint32(15)))")
                        bn = (f"T.Cast(\"int32\", T.bitwise_and(T.shift_right({bbuf}[{bw}, {br}], "
                              "T.Cast(\"uint32\", k % 8 * 4)), T.uint32(15)))")
                        av = an if unsigned else f"({an} - T.shift_left(T.bitwise_and({an}, 8), 1))"
                        bv = f"({bn} - T.shift_left(T.bitwise_and({bn}, 8), 1))"
                    with e.block(f"for k in range({kk}):"):
                        ai = f"({mi} * {NI} + {j}) * 4 + c"
                        e(f"{accbuf}[wv * 32 + ln, {ai}] = {accbuf}[wv * 32 + ln, {ai}] + {av} * {bv}")

    def mma(kind, abuf, aoff, bbuf, boff, accbuf, mi, j, h):
        if emu:
            return mma_emu(kind, abuf, bbuf, accbuf, mi, j, h)
        shape, ad, bd = ("m16n8k32", a_ptx8, "int8") if kind == "s8" else ("m16n8k64", a_ptx4, "int4")
        e(f"T.evaluate(T.ptx_legacy.mma(\"{shape}\", \"row\", \"col\", \"{ad}\", \"{bd}\", \"int32\", "
          f"{abuf}.data, {aoff}, {bbuf}.data, {boff}, {accbuf}.data, ({mi} * {NI} + {j}) * 4, False))")

    def lower(v, sh, lo, hi):
        return f"T.max(T.min(T.shift_right({v} + T.shift_right(T.shift_left(1, {sh}), 1), {sh}), {hi}), {lo})"

    def col_o(j, extra):
        return f"T.min(by * {BN} + {wni} * {8 * NI} + {j} * 8 + {extra}, {O - 1})"

    def compute(sv, stage):
        kh, kw, c, g = step(sv)
        with _Threads():
            for mi in range(MI):
                for h in range(2):
                    def a_addr(l, mi=mi, h=h):
                        row = f"{wmi} * {16 * MI} + {mi * 16} + {l} % 8 + {l} // 8 % 2 * 8"
                        return f"{stage} * {BM * KSTEP} + {swz(row, f'{2 * h} + {l} // 16')}"
                    ldmatrix("sa", "afr", mi * 8 + h * 4, a_addr)
            for j in range(NI):
                def b_addr(l, j=j):
                    row = f"{wni} * {8 * NI} + {j * 8} + {l} % 8"
                    return f"{stage} * {BN * KSTEP} + {swz(row, f'{l} // 8')}"
                ldmatrix("sb", "bfr", j * 4, b_addr)
        with e.block(f"if {g} < counts[{layer_index}]:"):
            with _Threads():
                with e.block(f"for j in {U(NI)}:"):
                    with e.block(f"for cc in {U(2)}:"):
                        e(f"{R('esh', 'j * 2 + cc')} = ew[{col_o('j', f'{lane} % 4 * 2 + cc')}, {g}] + ex[{g}]")
                with e.block(f"for i in {U(NACC)}:"):
                    e(f"{R('part', 'i')} = 0")
                if int4_mma:
                    # nibbles: INT4 reg r of the A fragment <- INT8 regs (r//2)*4 + r%2 (+2)
                    with e.block(f"for mi in {U(MI)}:"):
                        with e.block(f"for r in {U(4)}:"):
                            e(f"{R('a4', 'mi * 4 + r')} = T.uint32(0)")
                            with e.block(f"for hv in {U(2)}:"):
                                with e.block(f"for v in {U(4)}:"):
                                    byte = _u32byte(R("afr", "mi * 8 + r // 2 * 4 + r % 2 + hv * 2"), "v", not unsigned)
                                    nib = f"T.bitwise_and({lower(byte, f'ex[{g}]', lo4, hi4)}, 15)"
                                    e(f"{R('a4', 'mi * 4 + r')} = T.bitwise_or({R('a4', 'mi * 4 + r')}, "
                                      f"T.shift_left(T.Cast(\"uint32\", {nib}), T.Cast(\"uint32\", (hv * 4 + v) * 4)))")
                    with e.block(f"for j in {U(NI)}:"):
                        with e.block(f"for r in {U(2)}:"):
                            e(f"{R('b4', 'j * 2 + r')} = T.uint32(0)")
                            with e.block(f"for hv in {U(2)}:"):
                                with e.block(f"for v in {U(4)}:"):
                                    byte = _u32byte(R("bfr", "j * 4 + r * 2 + hv"), "v", True)
                                    sh = f"ew[{col_o('j', f'{lane} // 4')}, {g}]"
                                    nib = f"T.bitwise_and({lower(byte, sh, -8, 7)}, 15)"
                                    e(f"{R('b4', 'j * 2 + r')} = T.bitwise_or({R('b4', 'j * 2 + r')}, "
                                      f"T.shift_left(T.Cast(\"uint32\", {nib}), T.Cast(\"uint32\", (hv * 4 + v) * 4)))")
            if int4_mma:
                for mi in range(MI):
                    for j in range(NI):
                        mma("s4", "a4", mi * 4, "b4", j * 2, "part", mi, j, 0)
            else:
                with _Threads():
                    # sm_90: lowered codes kept in bytes for the INT8 mma
                    with e.block(f"for i in {U(MI * 8)}:"):
                        e(f"{R('ax', 'i')} = T.uint32(0)")
                        with e.block(f"for v in {U(4)}:"):
                            byte = _u32byte(R("afr", "i"), "v", not unsigned)
                            code = lower(byte, f"ex[{g}]", lo4, hi4)
                            e(f"{R('ax', 'i')} = T.bitwise_or({R('ax', 'i')}, T.shift_left(T.Cast(\"uint32\", "
                              f"T.bitwise_and({code}, 255)), T.Cast(\"uint32\", v * 8)))")
                    with e.block(f"for i in {U(NI * 4)}:"):
                        e(f"{R('bx8', 'i')} = T.uint32(0)")
                        with e.block(f"for v in {U(4)}:"):
                            byte = _u32byte(R("bfr", "i"), "v", True)
                            code = lower(byte, f"ew[{col_o('i // 4', f'{lane} // 4')}, {g}]", -8, 7)
                            e(f"{R('bx8', 'i')} = T.bitwise_or({R('bx8', 'i')}, T.shift_left(T.Cast(\"uint32\", "
                              f"T.bitwise_and({code}, 255)), T.Cast(\"uint32\", v * 8)))")
                for mi in range(MI):
                    for j in range(NI):
                        for h in range(2):
                            mma("s8", "ax", mi * 8 + h * 4, "bx8", j * 4 + h * 2, "part", mi, j, h)
            with _Threads():
                with e.block(f"for i in {U(NACC)}:"):
                    e(f"{R('acc', 'i')} = {R('acc', 'i')} + T.shift_left({R('part', 'i')}, "
                      f"{R('esh', f'i % 2 + i // 4 % {NI} * 2')})")
        with e.block("else:"):
            for mi in range(MI):
                for j in range(NI):
                    for h in range(2):
                        mma("s8", "afr", mi * 8 + h * 4, "bfr", j * 4 + h * 2, "acc", mi, j, h)

    # ---- body
    with _Threads():
        with e.block(f"for i in {U(NACC)}:"):
            e(f"{R('acc', 'i')} = 0")
    for st in range(ST - 1):
        if st < S:
            load(str(st), str(st))
        elif not emu:
            e("T.ptx.cp.async_.commit_group()")
    with e.block(f"for s in range({S}):"):
        if not emu:
            e(f"T.ptx.cp.async_.wait_group({ST - 2})")
            e("T.tvm_storage_sync(\"shared\")")
        with e.block(f"if s + {ST - 1} < {S}:"):
            load(f"s + {ST - 1}", f"(s + {ST - 1}) % {ST}")
        if not emu:
            with e.block("else:"):
                e("T.ptx.cp.async_.commit_group()")
        compute("s", f"s % {ST}")

    # ---- epilogue: dequantize + bias, rounded like numpy (no FMA)
    with _Threads():
        with e.block(f"for mi in {U(MI)}:"):
            with e.block(f"for j in {U(NI)}:"):
                with e.block(f"for c in {U(4)}:"):
                    m = f"bx * {BM} + {wmi} * {16 * MI} + mi * 16 + {lane} // 4 + c // 2 * 8"
                    o = f"by * {BN} + {wni} * {8 * NI} + j * 8 + {lane} % 4 * 2 + c % 2"
                    _epilogue_store(e, shp, m, o, R('acc', f'(mi * {NI} + j) * 4 + c'), M, O, emu)
    return "\n".join(out + e.lines) + "\n"
