"""Intel AMX for pointwise (1x1) convs: one tile instruction per 16 x 16 x 64 block.

AVX-512 VNNI (``x86_intrin.py``) does 64 multiply-adds per instruction; an AMX ``tdpbsud``
multiplies a 16 x K tile of signed bytes by a K x 16 tile of unsigned bytes (K up to 64) into 16 x
16 int32 accumulators held in tile registers: 16k multiply-adds per instruction. ONNX Runtime's
INT8 GEMMs use it on CPUs that have it; without it our pointwise convs ran at a fraction of its
speed at batch 32.

The mapping fits the layouts the VNNI path already writes:

* weights (tile A, signed): the ``"OIHWo4i"`` layout with ``ob == 1`` is ``[O, C/4, 4]``, so a
  tile row is one output channel's next ``4 * kcb`` input channels, contiguous;
* activations (tile B, unsigned): the packed spatial-lanes input ``[N, C/4, HW, 4]`` is already
  the VNNI layout AMX's second operand wants: a tile row is 16 positions x 4 channels, contiguous;
* accumulators (tile C): ``[o][position]``, the layout the spatial-lanes epilogue reads (NCHW rows).

Signed activation codes go in +128 as on the VNNI path (the kernel's ``w_sum`` correction).
Which convs take it is `passes/pack_conv_input.py`'s choice (measured there).

Each call saves the thread's tile configuration and loads it back at the end: a library in the same
thread may keep its own configuration loaded between its calls (ONNX Runtime's INT8 GEMMs do).

Using AMX needs the CPU flags, an LLVM target with ``+amx-tile,+amx-int8``, and the process's
permission for the tile state (Linux ``arch_prctl(ARCH_REQ_XCOMP_PERM)``), which
:func:`amx_usable` requests; a process that loads a built artifact requests it again before its
first call (``runtime``).
"""
from __future__ import annotations

import ctypes
import functools
import struct

import tvm

__all__ = ["amx_usable", "request_amx_permission", "with_amx", "target_has_amx", "get_amx_intrin", "amx_blocking"]

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158        # x86-64
AMX_ATTRS = ("+amx-tile", "+amx-int8")


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def request_amx_permission() -> bool:
    """Ask Linux for this process's AMX tile state; True when granted (idempotent). Without it the
    first tile instruction kills the process with SIGILL."""
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    if not {"amx_tile", "amx_int8"} <= _cpu_flags():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def amx_usable() -> bool:
    """This host can run AMX INT8 code in this process (flags present, permission granted)."""
    return request_amx_permission()


def target_has_amx(target) -> bool:
    from tvm.target import codegen

    try:
        tgt = tvm.target.Target(target)
        return str(tgt.kind.name) == "llvm" and bool(codegen.target_has_features(["amx-tile", "amx-int8"], tgt))
    except Exception:  # noqa: BLE001
        return False


def with_amx(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with the AMX features added (LLVM names the host CPU from its model number,
    which a virtual machine may report as a CPU without AMX)."""
    if target_has_amx(target):
        return target
    cfg = dict(target.export())
    cfg["mattr"] = list(cfg.get("mattr", []) or []) + list(AMX_ATTRS)
    cfg.pop("keys", None)
    return tvm.target.Target(cfg)


def amx_blocking(O: int, CB: int):
    """(rows of an accumulator tile, accumulator tiles along o, input-channel quads per K step),
    or None when the layer does not map: 16 output channels per tile (8 when O is a multiple of 8
    only), two tiles along o when they fit, and the largest divisor of C/4 up to 16 as the K step
    (so every step has the same tile shape: the tile configuration is one per kernel)."""
    if O % 16 == 0:
        orow = 16
    elif O % 8 == 0:
        orow = 8
    else:
        return None
    n_o = 2 if O % (2 * orow) == 0 else 1
    kcb = max(d for d in range(1, min(CB, 16) + 1) if CB % d == 0)
    return orow, n_o, kcb


def _tile_config(shapes) -> list:
    """The 64-byte LDTILECFG operand as 16 int32 words: palette 1, then per tile register its
    bytes per row (u16 at 16 + 2t) and its rows (u8 at 48 + t)."""
    raw = bytearray(64)
    raw[0] = 1
    for t, (rows, colsb) in shapes.items():
        struct.pack_into("<H", raw, 16 + 2 * t, colsb)
        raw[48 + t] = rows
    return list(struct.unpack("<16i", bytes(raw)))


_REGISTERED: dict = {}


def get_amx_intrin(OT: int, P: int, CB: int, orow: int, kcb: int, n_p: int) -> str:
    """Register (once per shape) and return a tensor intrinsic computing a whole accumulator tile
    ``C[1, OT, 1, P] = sum_{cb, j} B[0, cb, p, j] * A[o, cb, 0, 0, 0, j]`` (the ``acc`` block of
    ``compute.conv2d_int8(spatial_lanes=True, ob=1)`` under its tile loop) with AMX: per block of
    ``16 * n_p`` positions, ``OT / orow`` x ``n_p`` accumulator tiles stay in registers over all
    K steps. When ``P`` is not a multiple of 16 (a 14 x 14 or 7 x 7 plane), the last
    ``P % 16`` positions are one more block on narrower tiles (their own registers: the tile
    configuration is loaded once per call, and loading it clears the tiles)."""
    key = (OT, P, CB, orow, kcb, n_p)
    if key in _REGISTERED:
        return _REGISTERED[key]
    n_o = OT // orow
    pw, tail = 16 * n_p, P % 16
    assert OT % orow == 0 and CB % kcb == 0 and (P - tail) % pw == 0, key
    regs = iter(range(8))
    creg = {(i, j): next(regs) for i in range(n_o) for j in range(n_p)}
    areg = {i: next(regs) for i in range(n_o)}
    breg = {j: next(regs) for j in range(n_p)}
    shapes = {r: (orow, 64) for r in creg.values()}
    shapes.update({r: (orow, 4 * kcb) for r in areg.values()})
    shapes.update({r: (kcb, 64) for r in breg.values()})
    if tail:
        tcreg = {(i, 0): next(regs) for i in range(n_o)}
        tbreg = {0: next(regs)}
        shapes.update({r: (orow, 4 * tail) for r in tcreg.values()})
        shapes.update({r: (kcb, 4 * tail) for r in tbreg.values()})
    assert len(shapes) <= 8, key
    words = _tile_config(shapes)

    sig = f"""
    sa0 = T.int32(); sa1 = T.int32(); sa2 = T.int32(); sa3 = T.int32(); sa4 = T.int32()
    sb0 = T.int32(); sb1 = T.int32(); sb2 = T.int32()
    sc0 = T.int32(); sc1 = T.int32(); sc2 = T.int32()
    A = T.match_buffer(a, ({OT}, {CB}, 1, 1, 1, 4), "int8", offset_factor=1, strides=[sa0, sa1, sa2, sa3, sa4, 1])
    B = T.match_buffer(b, (1, {CB}, {P}, 4), "uint8", offset_factor=1, strides=[sb0, sb1, sb2, 1])
    C = T.match_buffer(c, (1, {OT}, 1, {P}), "int32", offset_factor=1, strides=[sc0, sc1, sc2, 1])
    with T.sblock("root"):
        T.reads(B[0, 0:{CB}, 0:{P}, 0:4], A[0:{OT}, 0:{CB}, 0, 0, 0, 0:4])
        T.writes(C[0, 0:{OT}, 0, 0:{P}])
"""
    desc = f"""
@T.prim_func(s_tir=True)
def desc(a: T.handle, b: T.handle, c: T.handle) -> None:{sig}
        for n, o, oi, p, rb, rj in T.grid(1, {OT}, 1, {P}, {CB}, 4):
            with T.sblock("update"):
                vo, vp, vrb, vrj = T.axis.remap("SSRR", [o, p, rb, rj])
                T.reads(C[0, vo, 0, vp], B[0, vrb, vp, vrj], A[vo, vrb, 0, 0, 0, vrj])
                T.writes(C[0, vo, 0, vp])
                with T.init():
                    C[0, vo, 0, vp] = 0
                C[0, vo, 0, vp] = C[0, vo, 0, vp] + T.cast(B[0, vrb, vp, vrj], "int32") * T.cast(A[vo, vrb, 0, 0, 0, vrj], "int32")
"""

    def call(name, *args):
        return f'T.evaluate(T.call_llvm_intrin("void", "llvm.x86.{name}", {", ".join(args)}))'

    def block(p0, cregs, bregs):
        """One block of positions from ``p0``: zero its accumulator tiles, run every K step,
        store them."""
        cstride = 'T.Cast("int64", sc1 * 4)'
        lines = [call("tilezero", f"T.uint8({r})") for r in cregs.values()]
        lines.append(f"for kc in T.serial({CB // kcb}):")
        step = [call("tileloadd64", f"T.uint8({r})", f"T.address_of(A[{i * orow}, kc * {kcb}, 0, 0, 0, 0])",
                     'T.Cast("int64", sa0)') for i, r in areg.items()]
        step += [call("tileloadd64", f"T.uint8({r})", f"T.address_of(B[0, kc * {kcb}, {p0} + {j * 16}, 0])",
                      'T.Cast("int64", sb1)') for j, r in bregs.items()]
        step += [call("tdpbsud", f"T.uint8({r})", f"T.uint8({areg[i]})", f"T.uint8({bregs[j]})")
                 for (i, j), r in cregs.items()]
        lines += ["    " + x for x in step]
        lines += [call("tilestored64", f"T.uint8({r})", f"T.address_of(C[0, {i * orow}, 0, {p0} + {j * 16}])", cstride)
                  for (i, j), r in cregs.items()]
        return lines

    # the caller's tile configuration is saved and put back: a library in the same thread may
    # keep its own loaded between calls (ONNX Runtime's AMX GEMMs do, and raised SIGILL after
    # running on ours); a saved palette 0 puts the tiles back in their initial state
    body = ['saved = T.decl_buffer((16,), "int32", scope="local")',
            'cfg = T.decl_buffer((16,), "int32", scope="local")',
            call("sttilecfg", "T.address_of(saved[0])")]
    body += [f"cfg[{k}] = {w}" for k, w in enumerate(words)]
    body.append(call("ldtilecfg", "T.address_of(cfg[0])"))
    if P // pw:
        body.append(f"for pb in T.serial({P // pw}):")
        body += ["    " + x for x in block(f"pb * {pw}", creg, breg)]
    if tail:
        body += block(str(P - tail), tcreg, tbreg)
    body.append(call("ldtilecfg", "T.address_of(saved[0])"))
    impl = (f"""
@T.prim_func(s_tir=True)
def impl(a: T.handle, b: T.handle, c: T.handle) -> None:{sig}""" + "".join("        " + x + "\n" for x in body))
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T  # noqa: F401  (the parsed sources' namespace)
    from tvm.script.parser import parse

    d = parse(desc, extra_vars={"T": T}, s_tir=True)
    m = parse(impl, extra_vars={"T": T}, s_tir=True)
    name = "flexiq_amx_" + "_".join(str(v) for v in key)
    TensorIntrin.register(name, d, m, override=True)
    _REGISTERED[key] = name
    return name
