"""x86 VNNI tensor intrinsics (u8 x s8 -> s32, ``lanes`` outputs x 4 reductions).

A copy of ``tvm.s_tir.tensor_intrin.x86.dot_16x4_vnni`` (with ``T.let`` bindings: in TVM 0.27
TVMScript a plain ``x = expr`` allocates a local buffer, which lowers to 5 workspace
allocations per call site) (plus a 256-bit 8-lane variant),
registered under our own names: importing ``tvm.s_tir.tensor_intrin`` takes ~40 s on this
machine (it registers every backend's intrinsics), this module takes milliseconds.

``C[i] += sum_k int32(A[k]) * int32(B[i, k])`` with A uint8[4] (broadcast), B int8[lanes, 4],
C int32[lanes], implemented by ``llvm.x86.avx512.vpdpbusd.{512,256}``.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_16x4 = "flexiq_dot_16x4_vnni"
VNNI_8x4 = "flexiq_dot_8x4_vnni"


@T.prim_func(s_tir=True)
def _desc16(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _impl16(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        A_u8x4: T.let = A.vload([0], "uint8x4")
        A_i32: T.let = T.reinterpret(A_u8x4, dtype="int32")
        B_i8x64: T.let = B.vload([0, 0], dtype="int8x64")
        B_i32x16: T.let = T.reinterpret(B_i8x64, dtype="int32x16")
        C_i32x16: T.let = C.vload([0], dtype="int32x16")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C_i32x16,
            T.broadcast(A_i32, 16),
            B_i32x16,
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _desc8(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        for i in T.serial(0, 8):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _impl8(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        A_u8x4: T.let = A.vload([0], "uint8x4")
        A_i32: T.let = T.reinterpret(A_u8x4, dtype="int32")
        B_i8x32: T.let = B.vload([0, 0], dtype="int8x32")
        B_i32x8: T.let = T.reinterpret(B_i8x32, dtype="int32x8")
        C_i32x8: T.let = C.vload([0], dtype="int32x8")
        C[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
            C_i32x8,
            T.broadcast(A_i32, 8),
            B_i32x8,
            dtype="int32x8",
        )


# LLVM >= 21/22 declares vpdpbusd on <N x i8> byte operands (older LLVM: <N/4 x i32>).
@T.prim_func(s_tir=True)
def _impl16_b(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        A_u8x4: T.let = A.vload([0], "uint8x4")
        A_i32: T.let = T.reinterpret(A_u8x4, dtype="int32")
        A_i8x64: T.let = T.reinterpret(T.broadcast(A_i32, 16), dtype="int8x64")
        B_i8x64: T.let = B.vload([0, 0], dtype="int8x64")
        C_i32x16: T.let = C.vload([0], dtype="int32x16")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C_i32x16,
            A_i8x64,
            B_i8x64,
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _impl8_b(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        A_u8x4: T.let = A.vload([0], "uint8x4")
        A_i32: T.let = T.reinterpret(A_u8x4, dtype="int32")
        A_i8x32: T.let = T.reinterpret(T.broadcast(A_i32, 8), dtype="int8x32")
        B_i8x32: T.let = B.vload([0, 0], dtype="int8x32")
        C_i32x8: T.let = C.vload([0], dtype="int32x8")
        C[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
            C_i32x8,
            A_i8x32,
            B_i8x32,
            dtype="int32x8",
        )


# Spatial lanes: 16 output POSITIONS of one output channel per instruction. A = 16 positions x 4
# channels of the packed activation (64 contiguous bytes), B = that channel's 4 weights (broadcast).
# The accumulator then runs along the output row, so the NCHW epilogue stores whole vectors (the
# 16 x 4 form above accumulates 16 output channels and must transpose into NCHW).
VNNI_S16x4 = "flexiq_dot_spatial16x4_vnni"


@T.prim_func(s_tir=True)
def _desc_s16(
    A: T.Buffer((16, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")


@T.prim_func(s_tir=True)
def _impl_s16_b(
    A: T.Buffer((16, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        A_u8x64: T.let = A.vload([0, 0], dtype="uint8x64")
        B_i8x4: T.let = B.vload([0], "int8x4")
        B_i32: T.let = T.reinterpret(B_i8x4, dtype="int32")
        B_i8x64: T.let = T.reinterpret(T.broadcast(B_i32, 16), dtype="int8x64")
        C_i32x16: T.let = C.vload([0], dtype="int32x16")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C_i32x16,
            T.reinterpret(A_u8x64, dtype="int8x64"),
            B_i8x64,
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _impl_s16(
    A: T.Buffer((16, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        A_u8x64: T.let = A.vload([0, 0], dtype="uint8x64")
        B_i8x4: T.let = B.vload([0], "int8x4")
        B_i32: T.let = T.reinterpret(B_i8x4, dtype="int32")
        C_i32x16: T.let = C.vload([0], dtype="int32x16")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C_i32x16,
            T.reinterpret(A_u8x64, dtype="int32x16"),
            T.broadcast(B_i32, 16),
            dtype="int32x16",
        )


_REGISTERED = {}


def _probe(impl, target) -> bool:
    """Does this LLVM accept the impl's intrinsic signature? (compile it standalone)."""
    import tvm

    try:
        f = impl.with_attr("global_symbol", "flexiq_vnni_probe")
        tvm.compile(tvm.IRModule({"flexiq_vnni_probe": f}), target=target)
        return True
    except Exception:  # noqa: BLE001
        return False


def get_intrin(lanes, target) -> str:
    """Register (once) and return the name of the lanes x 4 VNNI intrinsic for this LLVM
    (lanes 16 or 8: output channels; "spatial16": output positions)."""
    if lanes in _REGISTERED:
        return _REGISTERED[lanes]
    desc, impls = {16: (_desc16, (_impl16_b, _impl16)), 8: (_desc8, (_impl8_b, _impl8)),
                   "spatial16": (_desc_s16, (_impl_s16_b, _impl_s16))}[lanes]
    name = {16: VNNI_16x4, 8: VNNI_8x4, "spatial16": VNNI_S16x4}[lanes]
    for impl in impls:
        if _probe(impl, target):
            TensorIntrin.register(name, desc, impl, override=True)
            _REGISTERED[lanes] = name
            return name
    raise RuntimeError("no usable llvm.x86.avx512.vpdpbusd signature")
