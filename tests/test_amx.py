"""Intel AMX for the pointwise convs whose plane the spatial-lanes VNNI form cannot take
(schedules/x86_amx.py, compute.conv2d_int8(amx=True), passes/pack_conv_input.py).

The kernels are checked bit for bit against numpy integer arithmetic (the accumulator) and the
float32 epilogue computed in numpy; the whole-model test checks an AMX build against the plain
build at every ratio. Running AMX code needs a CPU with AMX (and Linux's permission, which the
package requests); the code generation and the rewrite are checked on any host."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm

import flexiq_tvm as fq
from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
from flexiq_tvm.schedules import compute as fc
from flexiq_tvm.schedules import llvm as fl
from flexiq_tvm.schedules.compute import KERNEL_ATTR
from flexiq_tvm.schedules.x86_amx import amx_blocking, amx_usable, target_has_amx, with_amx
from flexiq_tvm.targets import get_target
from conftest import assert_builds_agree

BASE = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
AMX = with_amx(BASE)
needs_amx = pytest.mark.skipif(not amx_usable(), reason="this CPU has no AMX (the kernels only compile here)")

# (N, C, H, W, O, signed input): tails of 4 (14x14) and 1 (7x7) positions, C not a multiple of 4
# (C/4 = 5 quads: K steps of 5), O = 24 (8-row tiles), O = 48 (one 16-row tile per block), a
# plane that is a multiple of 16 (no tail), >= 2M MACs (threaded)
CASES = [(2, 64, 14, 14, 32, True), (1, 20, 7, 7, 24, False), (3, 96, 7, 7, 48, True),
         (1, 36, 4, 8, 16, False), (2, 160, 14, 14, 64, False)]


def _packed(q, unsigned):
    """[N, C, H, W] codes -> the packed spatial-lanes input [N, C/4, H*W, 4] (signed + 128)."""
    N, C, H, W = q.shape
    CB = (C + 3) // 4
    v = (q if unsigned else q + 128).astype(np.int64)
    out = np.zeros((N, CB * 4, H * W), np.uint8)
    out[:, :C] = v.reshape(N, C, H * W)
    return out.reshape(N, CB, 4, H * W).transpose(0, 1, 3, 2).copy()


def _weights(w):
    """[O, C] -> the ob = 1 "OIHWo4i" layout [O, C/4, 1, 1, 1, 4]."""
    O, C = w.shape
    CB = (C + 3) // 4
    out = np.zeros((O, CB * 4), np.int8)
    out[:, :C] = w
    return out.reshape(O, CB, 1, 1, 1, 4)


def _run(f, args, out_shape, dtype):
    ex = fl.build(f, "k", target=AMX)
    dev = tvm.cpu()
    targs = [tvm.runtime.tensor(a, dev) for a in args] + [tvm.runtime.tensor(np.zeros(out_shape, dtype), dev)]
    ex["k"](*targs)
    return targs[-1].numpy()


@needs_amx
@pytest.mark.parametrize("case", CASES, ids=[f"amx{i}" for i in range(len(CASES))])
def test_amx_conv_bit_exact(case):
    N, C, H, W, O, signed = case
    unsigned = not signed
    rng = np.random.default_rng(C * 1000 + O)
    q = rng.integers(-128 if signed else 0, 128 if signed else 256, (N, C, H, W)).astype(np.int64)
    w = rng.integers(-127, 128, (O, C)).astype(np.int64)
    scale = rng.uniform(1e-4, 1e-2, O).astype(np.float32)
    bias = rng.normal(size=O).astype(np.float32)
    acc_ref = np.einsum("oc,nchw->nohw", w, q)
    args = [_packed(q, unsigned), _weights(w), scale, bias]
    opts = dict(unsigned=unsigned, ob=1, layout="OIHWo4i", packed_input=True, spatial_lanes=True, amx=True)
    acc = _run(fc.conv2d_int8((N, C, H, W), (O, C, 1, 1), out="acc", **opts), args, (N, O, H, W), "int32")
    np.testing.assert_array_equal(acc.astype(np.int64), acc_ref)
    f32 = np.float32
    y_ref = (acc_ref.astype(f32) * scale[None, :, None, None]).astype(f32) + bias[None, :, None, None]
    y = _run(fc.conv2d_int8((N, C, H, W), (O, C, 1, 1), act=(0.0, 6.0), **opts), args, (N, O, H, W), "float32")
    np.testing.assert_array_equal(y, np.clip(y_ref, f32(0), f32(6)))
    res = rng.standard_normal((N, O, H, W)).astype(np.float32)
    yr = _run(fc.conv2d_int8((N, C, H, W), (O, C, 1, 1), residual=True, **opts), args + [res], (N, O, H, W), "float32")
    np.testing.assert_array_equal(yr, y_ref + res)


@needs_amx
@pytest.mark.parametrize("N", [1, 8])
def test_amx_requant_writes_the_padded_codes(N):
    """An AMX 1x1 conv whose epilogue writes the reader's padded codes (passes.fuse_requant; the
    activation folded into the code clamp, an asymmetric zero border, one and several threads'
    worth of blocks): against numpy's conv, epilogue, ReLU6 and quantize rule."""
    C, H, W, O, s_q, pad = 24, 7, 7, 64, 0.03, (1, 2, 1, 1)
    rng = np.random.default_rng(N)
    q = rng.integers(0, 256, (N, C, H, W)).astype(np.int64)
    w = rng.integers(-127, 128, (O, C)).astype(np.int64)
    scale = rng.uniform(1e-4, 1e-3, O).astype(np.float32)
    bias = rng.normal(size=O).astype(np.float32)
    f32 = np.float32
    y = (np.einsum("oc,nchw->nohw", w, q).astype(f32) * scale[None, :, None, None]).astype(f32) + bias[None, :, None, None]
    code = np.clip(np.floor(np.clip(y, f32(0), f32(6)) / f32(s_q) + f32(0.5)), 0, 255)
    t, l, b, r = pad
    ref = np.zeros((N, O, H + t + b, W + l + r), np.int64)
    ref[:, :, t:t + H, l:l + W] = code
    opts = dict(unsigned=True, ob=1, layout="OIHWo4i", packed_input=True, spatial_lanes=True, amx=True, act=(0.0, 6.0))
    f = fc.conv2d_int8((N, C, H, W), (O, C, 1, 1), **opts,
                       requant=dict(scale=s_q, unsigned=True, pad=pad, layer_index=0, num_layers=1))
    args = [_packed(q, True), _weights(w), scale, bias, np.zeros(1, np.int32), np.zeros(O, np.int32),
            np.zeros(O, np.int32)]
    out = _run(f, args, ref.shape, "uint8")
    np.testing.assert_array_equal(out.astype(np.int64), ref)


def test_amx_kernel_compiles_and_uses_tile_instructions():
    """On any host: the AMX form of a 7x7 pointwise conv generates tile instructions (with a
    narrower tile for the last position), with the caller's tile configuration saved and put
    back."""
    f = fc.conv2d_int8((1, 64, 7, 7), (32, 64, 1, 1), ob=1, layout="OIHWo4i", packed_input=True,
                       spatial_lanes=True, amx=True)
    mod = tvm.IRModule({"k": fl.schedule_llvm(f, AMX).with_attr("global_symbol", "k")})
    text = tvm.compile(mod, target=AMX).mod.inspect_source("asm")
    for ins in ("ldtilecfg", "sttilecfg", "tdpbsud", "tileloadd", "tilestored", "tilezero"):
        assert ins in text, ins
    assert target_has_amx(AMX) and not target_has_amx(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    with pytest.raises(ValueError, match="amx needs spatial_lanes"):
        fc.conv2d_int8((1, 64, 7, 7), (32, 64, 1, 1), layout="OIHWo4i", packed_input=True, amx=True)


def test_amx_blocking():
    assert amx_blocking(64, 24) == (16, 2, 12)     # 96 channels: K steps of 12 quads
    assert amx_blocking(48, 40) == (16, 1, 10)
    assert amx_blocking(24, 5) == (8, 1, 5)
    assert amx_blocking(20, 16) is None             # not a multiple of 8: stays on VNNI


def _pointwise_model(g):
    """Pointwise convs over a 14x14 and a 7x7 plane (neither a multiple of 16 positions: all go
    to AMX), 16 to 96 input channels, ReLU6s, a residual add and a stride-2 depthwise conv."""
    def relu6():
        return g.node("Clip", [g.cur, g.const(np.float32(0.0), "lo"), g.const(np.float32(6.0), "hi")])

    g.conv(3, 16, 3, 1, 1), relu6()
    g.conv(16, 64, 1, 1, 0), relu6()
    x = g.conv(64, 32, 1, 1, 0)
    g.conv(32, 96, 1, 1, 0), relu6()
    y = g.conv(96, 32, 1, 1, 0)
    g.node("Add", [x, y])
    g.conv(32, 32, 3, 2, 1, groups=32), relu6()
    g.conv(32, 48, 1, 1, 0)
    g.gap(), g.flatten(), g.gemm(48, 10)


@pytest.fixture(scope="module")
def pointwise(tmp_path_factory):
    from conftest import GraphBuilder

    g = GraphBuilder((3, 14, 14), seed=11)
    _pointwise_model(g)
    model = fq.load_model(g.save(tmp_path_factory.mktemp("amx") / "pw.onnx"))
    calib = np.random.default_rng(1).standard_normal((16, 3, 14, 14)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=True, progress=False)
    return model, plan


def test_amx_rewrite_takes_the_planes_vnni_cannot(pointwise):
    """pack_conv_inputs(amx=True): the pointwise convs over 14x14 and 7x7 planes become AMX
    kernels with their weights lowered into the ob = 1 layout; without AMX in the target none is."""
    model, plan = pointwise
    rewritten = flexiq_rewrite(model.mod, model.layers, plan, 2)

    def kernels(tvm_target):
        mod = get_target("llvm", tvm_target=tvm_target).prepare(rewritten)
        return [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
                and KERNEL_ATTR in f.attrs]

    if amx_usable():
        ks = kernels(AMX)
        amx = [f for f in ks if int(f.attrs.get("flexiq.amx", 0))]
        assert sorted(int(f.attrs["flexiq.in_channels"]) for f in amx) == [16, 32, 32, 64, 96], [
            f.attrs.get("flexiq.in_channels") for f in amx]
        assert all(int(f.attrs["flexiq.ob"]) == 1 for f in amx)
        lowered = [f for f in ks if str(f.attrs[KERNEL_ATTR]) == "lower_weight" and str(f.attrs["flexiq.layout"]) == "OIHWo4i"
                   and int(f.attrs["flexiq.ob"]) == 1]
        assert len(lowered) == 5
    assert not any(int(f.attrs.get("flexiq.amx", 0)) for f in kernels(BASE))


@needs_amx
def test_amx_build_bit_exact_with_plain_build(pointwise):
    model, plan = pointwise
    plain = fq.compile(model, plan, batch_size=2, tvm_target=BASE, hoist_weights=False, fuse_activations=False,
                       kernel_variants=False, inline_layers=False)
    deploy = fq.compile(model, plan, batch_size=2, tvm_target=AMX)
    x = np.random.default_rng(5).standard_normal((3, 3, 14, 14)).astype(np.float32) * 2
    assert_builds_agree(deploy, plain, x, plan, (0.0, 0.25, 0.5, 1.0), seed=5)


@needs_amx
def test_amx_kernels_leave_the_callers_tile_configuration(tmp_path):
    """A library that keeps its AMX tile configuration loaded between calls (ONNX Runtime's INT8
    GEMMs do) must find it unchanged after our kernel ran in the same thread: before the kernels
    saved and restored it, ONNX Runtime died with SIGILL on its next call. Checked in a child
    process, with the configuration read back by the STTILECFG instruction itself."""
    script = textwrap.dedent(r"""
        import ctypes, numpy as np, tvm
        from flexiq_tvm.schedules import compute as fc, llvm as fl
        from flexiq_tvm.schedules.x86_amx import amx_usable, with_amx
        from tvm.script import tirx as T
        assert amx_usable()
        tgt = with_amx(fl.default_target())

        @T.prim_func
        def cfg_io(cfg: T.Buffer((16,), "int32"), out: T.Buffer((16,), "int32")):
            T.func_attr({"global_symbol": "cfg_io"})
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sttilecfg", T.address_of(out[0])))

        @T.prim_func
        def cfg_read(out: T.Buffer((16,), "int32")):
            T.func_attr({"global_symbol": "cfg_read"})
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sttilecfg", T.address_of(out[0])))

        io = tvm.compile(tvm.IRModule({"cfg_io": cfg_io, "cfg_read": cfg_read}), target=tgt)
        mine = np.zeros(16, np.int32); mine[0] = 1; mine[4] = (64 << 16) | 64; mine[12] = (16 << 8) | 16
        dev = tvm.cpu()
        a, b = tvm.runtime.tensor(mine, dev), tvm.runtime.tensor(np.zeros(16, np.int32), dev)
        io["cfg_io"](a, b)
        assert np.array_equal(b.numpy(), mine), b.numpy()
        f = fc.conv2d_int8((1, 64, 7, 7), (32, 64, 1, 1), ob=1, layout="OIHWo4i", packed_input=True,
                           spatial_lanes=True, amx=True)
        k = fl.build(f, "k", target=tgt)
        args = [np.zeros((1, 16, 49, 4), np.uint8), np.zeros((32, 16, 1, 1, 1, 4), np.int8),
                np.ones(32, np.float32), np.zeros(32, np.float32), np.zeros((1, 32, 7, 7), np.float32)]
        k["k"](*[tvm.runtime.tensor(v, dev) for v in args])
        c = tvm.runtime.tensor(np.zeros(16, np.int32), dev)
        io["cfg_read"](c)
        assert np.array_equal(c.numpy(), mine), c.numpy()
        print("kept")
    """)
    path = tmp_path / "tile_config.py"     # (TVMScript reads its functions' source from a file)
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "kept" in out.stdout, out.stdout + out.stderr
