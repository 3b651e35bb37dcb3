"""The CUDA target without a GPU (issues 6 and 17).

* bit-exact: the tensor-core GEMM kernel text built in ``mode="emu"`` for llvm (same fragment
  packing, nibble packing, group / shift logic and epilogue; each ``mma.sync`` replaced by a loop
  nest that decodes the 32 lanes' fragments by the PTX ISA layouts) against
  ``quant/reference.py``'s literal mixed dot product, for conv / dense, signed / unsigned
  activations, the INT4-mma (sm_80/86/89) and INT8-only (sm_90) variants, at several counts.
  The default kernel is the staged one (issue 17): its emulation also runs the shared-memory
  ring (``cp.async`` as a copy), the XOR swizzle and ``ldmatrix`` by its lane mapping; multi-warp
  tiles and 2/3/4 stages are covered, and the first (direct) kernel keeps two cases;
* SASS of the staged kernel (issue 17): LDGSTS + LDGDEPBAR/DEPBAR (cp.async pipeline), LDSM
  (ldmatrix), IMMA, no local-memory spills, for sm_80 and sm_90;
* compile: the CUDA source of every layer kind (tensor-core conv and dense, INT8-only sm_90
  variant, the CUDA-core depthwise path, the quantize kernels) goes through nvcc for sm_80, sm_89
  and sm_90 (skipped when nvcc is absent);
* SASS: cuobjdump on the sm_80 cubin shows ``IMMA.16864.S4.S4`` / ``IMMA.16832.S8.S8``
  (``U4`` / ``U8`` for unsigned activations), and sm_90 shows no 16864 (INT4) instruction
  (skipped without cuobjdump; ``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``);
* the whole-model build: ``fq.compile(..., target="cuda")`` of the demo model (with its
  depthwise-free CNN) and a graph with a depthwise conv lowers, and every kernel compiles.

Run: python3 -m pytest tests/test_cuda.py -q
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from flexiq_tvm.quant.layer import LayerSpec  # noqa: E402
from flexiq_tvm.quant.plan import LayerPlan  # noqa: E402
from flexiq_tvm.quant.reference import LayerReference  # noqa: E402
from flexiq_tvm.schedules import cuda as fcu  # noqa: E402
from flexiq_tvm.targets import cuda as tcuda  # noqa: E402

NVCC = tcuda.find_nvcc()
CUOBJDUMP = tcuda.find_cuobjdump()
need_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
need_cuobjdump = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None,
                                    reason="nvcc or cuobjdump/nvdisasm not found")


# ----------------------------------------------------------------------------- synthetic layers
def make_layer(op="conv2d", N=1, C=96, H=5, W=5, O=20, k=3, stride=1, pad=1, groups=1, group_size=64,
               unsigned=False, seed=0):
    rng = np.random.default_rng(seed)
    if op == "conv2d":
        w = rng.standard_normal((O, C // groups, k, k)).astype(np.float32)
        OH = (H + 2 * pad - k) // stride + 1
        OW = (W + 2 * pad - k) // stride + 1
        spec = LayerSpec("conv", "conv2d", w, rng.standard_normal(O).astype(np.float32), (C, H, W), (O, OH, OW),
                         groups=groups, strides=(stride, stride), padding=(pad,) * 4, act_unsigned=unsigned)
        macs = OH * OW * k * k
    else:
        w = rng.standard_normal((O, C)).astype(np.float32)
        spec = LayerSpec("fc", "dense", w, rng.standard_normal(O).astype(np.float32), (C,), (O,),
                         act_unsigned=unsigned)
        macs = 1
    G = -(-C // group_size)
    sizes = [group_size] * (G - 1) + [C - group_size * (G - 1)]
    absmax = np.abs(w.reshape(O, -1)).max(axis=1)
    plan = LayerPlan(name=spec.name, op=op, in_channels=C, out_channels=O, groups=groups, group_size=group_size,
                     order=rng.permutation(C), weight_scale=(absmax / 127).astype(np.float32),
                     act_scale=float(np.float32(0.02)), act_unsigned=unsigned,
                     act_shift=rng.integers(0, 5, G).astype(np.int32),
                     weight_shift=rng.integers(0, 5, (O, G)).astype(np.int32), macs_per_channel=macs,
                     group_sizes=sizes)
    x_shape = (N, C, H, W) if op == "conv2d" else (N, C)
    x = (rng.standard_normal(x_shape) * 1.5).astype(np.float32)
    if unsigned:
        x = np.abs(x)
    return spec, plan, x


def tc_kernels(spec, plan, x_shape, mode, int4_mma, layer_index=0, num_layers=1, kernel="staged", tile=None):
    """(quantize PrimFunc, gemm PrimFunc, constants) of the tensor-core path of one layer."""
    lay = fcu.tc_layout(plan.rank)
    q_w = LayerReference(spec, plan).q_w.astype(np.int8)
    kind = "cuda" if mode == "cuda" else "llvm"
    if spec.op == "conv2d":
        N, C, H, W = x_shape
        pt, pl, pb, pr = spec.padding
        _, O, OH, OW = (N,) + tuple(spec.out_shape)
        shp = fcu.GemmShape(N=N, Hp=H + pt + pb, Wp=W + pl + pr, O=O, OH=OH, OW=OW, KH=q_w.shape[2],
                            KW=q_w.shape[3], SH=spec.strides[0], SW=spec.strides[1], DH=spec.dilation[0],
                            DW=spec.dilation[1])
        qf = fcu.quantize_tc(x_shape, lay, plan.act_scale, plan.act_unsigned, pad=spec.padding, kind=kind)
    else:
        M, C = x_shape
        shp = fcu.GemmShape(N=M, Hp=1, Wp=1, O=spec.out_channels, OH=1, OW=1, dense=True)
        qf = fcu.quantize_tc(x_shape, lay, plan.act_scale, plan.act_unsigned, kind=kind)
    gf = fcu.gemm_tc(shp, lay, layer_index, num_layers, plan.act_unsigned, int4_mma=int4_mma, mode=mode,
                     kernel=kernel, tile=tile)
    consts = dict(src=lay.src, w=fcu.prepare_weight(q_w, lay), ex=np.asarray(plan.act_shift, np.int32),
                  ew=np.ascontiguousarray(plan.weight_shift, np.int32), scale=LayerReference(spec, plan).scale,
                  bias=np.asarray(spec.bias, np.float32), lay=lay, shp=shp)
    return qf, gf, consts


_BUILT = {}


def _llvm(func, name):
    return tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target="llvm")[name]


def run_emu(spec, plan, x, counts, int4_mma, kernel="staged", tile=None):
    # keyed by the spec object itself (kept alive in the cache): an id() alone can be reused by a
    # later spec once the first is garbage-collected, which handed one case another case's kernels
    key = (id(spec), int4_mma, kernel, tile)
    if key not in _BUILT or _BUILT[key][3] is not spec:
        qf, gf, c = tc_kernels(spec, plan, x.shape, "emu", int4_mma, kernel=kernel, tile=tile)
        _BUILT[key] = (_llvm(qf, "q"), _llvm(gf, "gemm"), c, spec)
    fq_, fg, c, _ = _BUILT[key]
    shp, lay = c["shp"], c["lay"]
    T = tvm.runtime.tensor
    xq = tvm.runtime.empty((shp.N, shp.Hp, shp.Wp, lay.Kc), "uint8" if plan.act_unsigned else "int8")
    fq_(T(x), T(c["src"]), xq)
    yshape = (shp.M, shp.O) if shp.dense else (shp.N, shp.O, shp.OH, shp.OW)
    y = tvm.runtime.empty(yshape, "float32")
    fg(xq, T(c["w"]), T(np.asarray(counts, np.int32)), T(c["ex"]), T(c["ew"]), T(c["scale"]), T(c["bias"]), y)
    return y.numpy()


CASES = [
    # (id, make_layer kwargs)
    ("conv3x3_s", dict(op="conv2d", C=96, O=20, unsigned=False)),
    ("conv3x3_u_stride2", dict(op="conv2d", N=2, C=80, H=6, W=7, O=24, stride=2, unsigned=True, seed=1)),
    ("dense_u", dict(op="dense", N=3, C=160, O=10, unsigned=True, seed=2)),
    ("dense_s", dict(op="dense", N=17, C=128, O=36, unsigned=False, seed=3)),
    # groups of 96 channels, each padded to two 64-channel steps (a group spanning pipeline steps)
    ("dense_g96", dict(op="dense", N=5, C=160, O=16, group_size=96, unsigned=False, seed=5)),
]


@pytest.mark.parametrize("int4_mma", [True, False], ids=["int4mma", "int8only_sm90"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gemm_emulated_bit_exact(case, int4_mma):
    spec, plan, x = make_layer(**case[1])
    ref = LayerReference(spec, plan)
    for k in sorted({0, 1, plan.n_groups}):
        got = run_emu(spec, plan, x, [k], int4_mma)
        want = ref.forward(x, k)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=f"count {k}")
    # the 4-bit path really differs from INT8 on these shifts (otherwise the test proves little)
    assert not np.array_equal(ref.forward(x, 0), ref.forward(x, plan.n_groups))


# the first (direct) kernel stays available (kernel="direct"): one signed-int4 and one sm_90 case
@pytest.mark.parametrize("case,int4_mma", [("conv3x3_u_stride2", True), ("dense_s", False)])
def test_direct_kernel_emulated_bit_exact(case, int4_mma):
    spec, plan, x = make_layer(**dict(CASES)[case])
    ref = LayerReference(spec, plan)
    for k in (0, plan.n_groups):
        np.testing.assert_array_equal(run_emu(spec, plan, x, [k], int4_mma, kernel="direct"), ref.forward(x, k))


# staged kernel with multi-warp tiles and other pipeline depths on a 3x3 conv (M=25, O=20, 18 steps):
# several warps share the staged tiles, threads issue several (or, for B, a guarded partial) copies
# each, 2 and 4 stages wrap the ring buffer differently
TILES = [(fcu.Tile(wm=2, wn=2, mi=1, ni=2, stages=2), True), (fcu.Tile(wm=2, wn=2, mi=1, ni=2, stages=2), False),
         (fcu.Tile(wm=2, wn=1, mi=2, ni=1, stages=4), True), (fcu.Tile(wm=1, wn=2, mi=1, ni=1, stages=3), False)]


@pytest.mark.parametrize("tile,int4_mma", TILES,
                         ids=[f"w{t.wm}x{t.wn}_m{t.mi}n{t.ni}_s{t.stages}_{'int4' if i else 'sm90'}" for t, i in TILES])
def test_staged_tiles_emulated_bit_exact(tile, int4_mma):
    spec, plan, x = make_layer(**dict(CASES)["conv3x3_s"])
    ref = LayerReference(spec, plan)
    for k in (0, 1, plan.n_groups):
        np.testing.assert_array_equal(run_emu(spec, plan, x, [k], int4_mma, tile=tile), ref.forward(x, k),
                                      err_msg=f"count {k}")


def test_swizzle_is_bank_conflict_free():
    """The 8 row addresses of one ldmatrix 8x8 matrix (8 consecutive tile rows, one 16-byte chunk)
    land in 8 different 16-byte bank groups of a 128-byte bank line; without the swizzle they
    would not (rows 2 apart collide), so this asserts something the layout buys."""
    for r0 in range(0, 64, 8):
        for ch in range(4):
            groups = {(fcu.smem_offset(r, ch) // 16) % 8 for r in range(r0, r0 + 8)}
            assert len(groups) == 8, (r0, ch)
            assert len({(r * fcu.KSTEP + ch * 16) // 16 % 8 for r in range(r0, r0 + 8)}) < 8
    # a bijection of each row's four chunks
    for r in range(16):
        assert sorted(fcu.smem_offset(r, ch) - r * fcu.KSTEP for ch in range(4)) == [0, 16, 32, 48]


def test_choose_tile_heuristic():
    # MobileNetV2-like pointwise conv at batch 32 (M = 32*56*56): the largest block, 128 x 64
    t = fcu.choose_tile(32 * 56 * 56, 144)
    assert (t.BM, t.BN, t.threads) == (128, 64, 256)
    # batch-1 dense (M = 1): one 16-row warp tile, as many column blocks as possible
    t = fcu.choose_tile(1, 1000)
    assert t.mi == 1 and t.wm == 1 and t.BM == 16
    # few blocks: shrink the block rather than leave SMs idle
    small = fcu.choose_tile(7 * 7, 320)
    assert -(-49 // small.BM) * -(-320 // small.BN) > -(-49 // 128) * -(-320 // 64)
    # narrow layer: no warps past the output channels
    assert fcu.choose_tile(4096, 16).BN == 16
    for M, O in ((1, 10), (197, 768), (32 * 197, 3072), (112 * 112, 32)):
        t = fcu.choose_tile(M, O)
        assert t.smem_bytes() <= 48 * 1024 and t.threads <= 256


def test_layout_padding_and_weight_permutation():
    rank = np.array([1, 0, 1, 0, 0], np.int32)
    lay = fcu.tc_layout(rank)
    assert lay.Kc == 128 and lay.offsets == [0, 64] and lay.sizes == [3, 2]
    assert list(lay.src[:4]) == [1, 3, 4, -1] and list(lay.src[64:67]) == [0, 2, -1]
    w = np.arange(2 * 5, dtype=np.int8).reshape(2, 5)
    wp = fcu.prepare_weight(w, lay)
    assert wp.shape == (2, 1, 1, 128)
    assert list(wp[1, 0, 0, :4]) == [6, 8, 9, 0] and list(wp[1, 0, 0, 64:67]) == [5, 7, 0]


def test_int4_native_arches():
    assert fcu.int4_native("sm_80") and fcu.int4_native("sm_86") and fcu.int4_native("sm_89")
    assert not fcu.int4_native("sm_90")


# ----------------------------------------------------------------------------- nvcc / SASS
_CUBINS = {}


def cuda_source(funcs, arch):
    tgt = tcuda.cuda_target(arch)
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    ex = tvm.compile(mod, target=tgt)
    return ex.mod.imports[0].inspect_source()


def arch_cubin(arch):
    """One cubin per arch holding the tensor-core kernels of an unsigned strided conv and a signed
    dense layer (both quantize kernels, both GEMMs); built once per test session."""
    if arch not in _CUBINS:
        funcs = {}
        for case in ("conv3x3_u_stride2", "dense_s"):
            spec, plan, x = make_layer(**dict(CASES)[case])
            qf, gf, _ = tc_kernels(spec, plan, x.shape, "cuda", fcu.int4_native(arch))
            funcs[f"quantize_{case}"] = fcu.schedule_elementwise(qf, "xq")
            funcs[f"gemm_{case}"] = gf
        # the direct kernel (kernel="direct") keeps compiling too
        spec, plan, x = make_layer(**dict(CASES)["dense_s"])
        funcs["gemmdirect_dense_s"] = tc_kernels(spec, plan, x.shape, "cuda", fcu.int4_native(arch),
                                                 kernel="direct")[1]
        _CUBINS[arch] = tcuda.nvcc_cubin(cuda_source(funcs, arch), arch)
    return _CUBINS[arch]


def sass_functions(text):
    """cuobjdump -sass text split per kernel: {function name: SASS}."""
    import re

    parts = re.split(r"\n\s*Function : (\S+)\n", "\n" + text)
    return dict(zip(parts[1::2], parts[2::2]))


def sass_counts(text, prefixes=("LDSM", "LDGSTS", "LDGDEPBAR", "DEPBAR", "IMMA", "LDL", "STL", "BAR.SYNC")):
    import re

    out = {}
    for ins in re.findall(r"\b([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)\b", text):
        if ins.startswith(prefixes):
            out[ins] = out.get(ins, 0) + 1
    return out


@need_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_tensor_core_kernels_compile(arch):
    assert len(arch_cubin(arch)) > 1000


@need_cuobjdump
def test_sass_has_int4_and_int8_tensor_core_instructions():
    sass_80 = tcuda.sass(arch_cubin("sm_80"))
    for ins in ("IMMA.16864.S4.S4", "IMMA.16832.S8.S8", "IMMA.16864.U4.S4", "IMMA.16832.U8.S8"):
        assert ins in sass_80, ins
    sass_90 = tcuda.sass(arch_cubin("sm_90"))
    assert "IMMA.16832.S8.S8" in sass_90 and "IMMA.16832.U8.S8" in sass_90
    assert "16864" not in sass_90          # no INT4 mma issued on Hopper


@need_cuobjdump
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_staged_kernel_structure(arch):
    """Each staged GEMM kernel (unsigned strided conv, signed dense) has the fast-kernel
    instructions: LDGSTS (cp.async global -> shared, 16 bytes, L1 bypass) with its commit
    (LDGDEPBAR) and wait (DEPBAR), LDSM (ldmatrix x4), IMMA (INT4 16864 on sm_80, only INT8 16832 on
    sm_90) and no local-memory traffic (fragments stay in registers); the direct kernel has no
    LDSM / LDGSTS (what it lacks is what this issue adds)."""
    funcs = sass_functions(tcuda.sass(arch_cubin(arch)))
    staged = {n: sass_counts(t) for n, t in funcs.items() if n.startswith("gemm_")}
    assert len(staged) == 2, list(funcs)
    for name, c in staged.items():
        unsigned = "_u_" in name
        assert c.get("LDGSTS.E.BYPASS.128", 0) > 0 and c.get("LDGDEPBAR", 0) > 0, (name, c)
        assert any(k.startswith("DEPBAR") for k in c), (name, c)
        assert c.get("LDSM.16.M88.4", 0) > 0 and c.get("BAR.SYNC", 0) + c.get("BAR.SYNC.DEFER_BLOCKING", 0) > 0, c
        i8 = "IMMA.16832.U8.S8" if unsigned else "IMMA.16832.S8.S8"
        i4 = "IMMA.16864.U4.S4" if unsigned else "IMMA.16864.S4.S4"
        assert c.get(i8, 0) > 0, (name, c)
        assert (c.get(i4, 0) > 0) == (arch != "sm_90"), (name, c)
        assert not any(k.startswith(("LDL", "STL")) for k in c), (name, c)
    direct = [sass_counts(t) for n, t in funcs.items() if n.startswith("gemmdirect_")]
    assert len(direct) == 1 and not any(k.startswith(("LDSM", "LDGSTS")) for k in direct[0]), direct


def test_group_size_must_be_a_multiple_of_64():
    from flexiq_tvm.errors import FlexiQError

    rank16 = np.repeat(np.arange(4), 16).astype(np.int32)
    with pytest.raises(FlexiQError, match="group_size"):
        tcuda.check_group_sizes(rank16, 3)
    tcuda.check_group_sizes(rank16, 3, allow_padded_groups=True)
    tcuda.check_group_sizes(np.repeat(np.arange(3), [64, 64, 40]).astype(np.int32))  # short last group: ok
    with pytest.raises(FlexiQError, match="arch"):
        tcuda.cuda_target("sm_75")


# ----------------------------------------------------------------------------- whole models
def _quantize(model, calib, group_size=64):
    import inspect

    import flexiq_tvm as fq

    kw = dict(group_size=group_size, search="range", progress=False)
    if "recover" in inspect.signature(fq.quantize).parameters:
        kw["recover"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fq.quantize(model, calib, **kw)


@pytest.fixture(scope="module")
def mobile_block(tmp_path_factory):
    """A MobileNet-like block (pointwise, depthwise, pointwise, dense) and its plan."""
    import flexiq_tvm as fq
    from tests.conftest import GraphBuilder

    d = tmp_path_factory.mktemp("cuda_block")
    g = GraphBuilder((32, 8, 8), seed=4)
    g.conv(32, 64, k=1, pad=0); g.relu()
    g.conv(64, 64, k=3, pad=1, groups=64); g.relu()
    g.conv(64, 128, k=1, pad=0); g.relu()
    g.gap(); g.flatten(); g.gemm(128, 10)
    path = g.save(str(d / "m.onnx"))
    calib = str(d / "c.npz")
    np.savez(calib, inputs=np.random.default_rng(0).standard_normal((8, 32, 8, 8)).astype(np.float32))
    model = fq.load_model(path)
    return model, _quantize(model, calib)


@need_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_model_with_depthwise_builds(mobile_block, arch):
    """The depthwise conv takes the CUDA-core path (dlight), the rest the tensor cores; the whole
    module's CUDA source compiles for every arch; sm_90 issues no INT4 mma."""
    model, plan = mobile_block
    tgt = tcuda.CUDATarget(arch=arch)
    ex = tgt.build_executable(model, plan)
    assert [r[0] for r in tgt.report["cuda_core_layers"]] == [1], tgt.report
    assert [r[0] for r in tgt.report["tensor_core_layers"]] == [0, 2, 3], tgt.report
    src = tcuda.cuda_module_source(ex)
    assert "mma.sync.aligned.m16n8k32" in src
    assert "cp.async.cg.shared.global" in src and "ldmatrix.sync.aligned.m8n8.x4" in src
    assert [r[1] for r in tgt.report["tiles"]] == [0, 2, 3], tgt.report
    assert ("m16n8k64" in src) == (arch != "sm_90")
    assert "llvm.arithmetic.fence" not in src and "__fdiv_rn" in src
    assert len(tcuda.nvcc_cubin(src, arch)) > 1000


def test_target_kernel_choice_and_tile_override(mobile_block):
    """kernel="direct" lowers the whole model onto the first kernel (no cp.async / ldmatrix in its
    source); an explicit tile for a layer replaces the heuristic's (the tuning hook)."""
    from flexiq_tvm.errors import FlexiQError
    from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite

    model, plan = mobile_block
    mod = flexiq_rewrite(*model.at(1), plan, 1) if hasattr(model, "at") else flexiq_rewrite(model.mod, model.layers, plan, 1)
    tile = fcu.Tile(wm=1, wn=2, mi=1, ni=2, stages=4)
    staged = tcuda.CUDATarget(arch="sm_80", tiles={2: tile})
    texts = {gv.name_hint: f.script() for gv, f in staged.lower(mod).functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and str(f.attrs.get("flexiq.kernel", "")) == "gemm_tc"}
    assert len(texts) == 3 and all("ptx_legacy.ldmatrix" in t and "T.ptx.cp(" in t for t in texts.values()), list(texts)
    chosen = {r[1]: r[5] for r in staged.report["tiles"]}
    assert chosen[2] == tile and chosen[0] != tile and chosen[0] == fcu.choose_tile(64, 64, sms=108)
    direct = tcuda.CUDATarget(arch="sm_80", kernel="direct")
    texts = [f.script() for _, f in direct.lower(mod).functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and str(f.attrs.get("flexiq.kernel", "")) == "gemm_tc"]
    assert len(texts) == 3 and not any("ldmatrix" in t or "T.ptx.cp(" in t for t in texts)
    assert direct.report["tiles"] == []
    with pytest.raises(FlexiQError, match="kernel"):
        tcuda.CUDATarget(kernel="cutlass")


@need_nvcc
def test_demo_model_builds(tmp_path):
    """fq.compile's lowering of the shipped demo model for sm_89: every conv/dense with >= 16
    input channels on the tensor cores, the 1-channel stem on the CUDA-core path."""
    import flexiq_tvm as fq
    from tests.conftest import ASSETS

    model = fq.load_model(os.path.join(ASSETS, "fashion_cnn.onnx"))
    with np.load(os.path.join(ASSETS, "fashion_calib.npz")) as z:
        calib = str(tmp_path / "c.npz")
        np.savez(calib, inputs=z["inputs"][:32])
    plan = _quantize(model, calib)
    tgt = tcuda.CUDATarget(arch="sm_89")
    ex = tgt.build_executable(model, plan)
    assert len(tgt.report["tensor_core_layers"]) == plan.num_layers - 1, tgt.report
    assert len(tcuda.nvcc_cubin(tcuda.cuda_module_source(ex), "sm_89")) > 1000


def test_cuda_target_registered():
    from flexiq_tvm.targets import available_targets, get_target

    assert "cuda" in available_targets()
    t = get_target("cuda", arch="sm_90")
    assert t.arch == "sm_90" and not t.int4_mma and not t.supports_bias_rows
