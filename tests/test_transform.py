"""FlexiQ inside a TVM user's own pipeline (flexiq_tvm.transform): from_onnx -> the user's passes ->
FlexiQRewrite -> tvm.compile(get_pipeline) -> VM, bit-exact with fq.compile's artifact."""
import os
import sys

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard
from tvm.relax.frontend.onnx import from_onnx

import flexiq_tvm as fq
from flexiq_tvm import transform as fqt
from flexiq_tvm.calibrate.data import load_data
from flexiq_tvm.quant.plan import PlanError
from conftest import GRAPHS, GraphBuilder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import existing_pipeline as ex  # noqa: E402  (the example is the user's flow under test)

RATIOS = (0.0, 0.5, 1.0)


def _layer_funcs(mod):
    return sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith(fqt.LAYER_FUNC_PREFIX))


def _run_vm(vm, dev, plan, x, ratio):
    return ex.run(vm, dev, plan, x, ratio)


def _fq_outputs(path, plan, x):
    cm = fq.compile(path, plan, target="llvm")
    out = {}
    for r in RATIOS:
        cm.set_ratio(r)
        out[r] = cm(x)
    return cm, out


@pytest.fixture(scope="module")
def demo(demo_paths):
    model = fq.load_model(demo_paths["model"])
    calib, _ = load_data(demo_paths["calib"], model)
    plan = fq.quantize(model, calib[:48], search="range", search_samples=8, recover=False, rounding="nearest",
                       progress=False)
    x, _ = load_data(demo_paths["test"], model)
    return demo_paths["model"], plan, x[:3]


def test_demo_user_pipeline_bit_exact_with_fq_compile(demo):
    path, plan, x = demo
    mod = ex.my_passes()(from_onnx(onnx.load(path)))
    fused = [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint != "main"]
    assert len(fused) >= 4, fused          # the user's FuseOpsByPattern grouped conv+bias+relu
    rewritten = fqt.FlexiQRewrite(plan, batch_size=1)(mod)
    assert _layer_funcs(rewritten) == [f"{fqt.LAYER_FUNC_PREFIX}{i}" for i in range(plan.num_layers)]
    assert not [g for g in rewritten.get_global_vars() if g.name_hint in fused]   # un-fused, then dropped
    assert [str(p) for p in rewritten["main"].params][1:] == ["counts"]
    tgt = fqt.resolve_target("llvm")
    vm = relax.VirtualMachine(tvm.compile(rewritten, target=tgt.tvm_target, relax_pipeline=fq.get_pipeline(tgt)),
                              tvm.cpu())
    _, want = _fq_outputs(path, plan, x)
    got = {r: _run_vm(vm, tvm.cpu(), plan, x, r) for r in RATIOS}
    for r in RATIOS:
        assert np.array_equal(got[r], want[r]), (r, np.abs(got[r] - want[r]).max())
    assert not np.array_equal(got[0.0], got[1.0])          # the ratio really reached the kernels


def test_codegen_wrapped_layers_and_bound_params(demo):
    """BYOC-style Codegen functions (a Composite local function inside) and weights kept as main's
    parameters (bound by params=) are handled alike: the rewrite finds every layer."""
    path, plan, _ = demo
    conv = is_op("relax.nn.conv2d")(wildcard(), wildcard())
    pats = [("otherlib.conv_bias", is_op("relax.add")(conv, wildcard()), {}),
            ("otherlib.matmul", is_op("relax.matmul")(wildcard(), wildcard()), {})]
    mod = from_onnx(onnx.load(path), keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    with pytest.raises(PlanError, match="bind them first"):
        fqt.FlexiQRewrite(plan)(mod)
    user = tvm.transform.Sequential([relax.transform.BindParams("main", dict(zip(mod["main"].params[1:],
                                                                                 params["main"]))),
                                     relax.transform.FoldConstant(),
                                     relax.transform.FuseOpsByPattern(pats, bind_constants=True,
                                                                      annotate_codegen=True)])(mod)
    codegen = [gv.name_hint for gv, f in user.functions_items()
               if f.attrs is not None and "Codegen" in f.attrs]
    assert len(codegen) == plan.num_layers
    by_bind = fqt.FlexiQRewrite(plan)(user)
    assert _layer_funcs(by_bind) == [f"{fqt.LAYER_FUNC_PREFIX}{i}" for i in range(plan.num_layers)]
    assert not any(f.attrs is not None and "Codegen" in f.attrs for _, f in by_bind.functions_items())
    by_params = fqt.FlexiQRewrite(plan, params=params)(mod)
    tvm.ir.assert_structural_equal(by_params["main"].params[1].ty, by_bind["main"].params[1].ty)
    assert _layer_funcs(by_params) == _layer_funcs(by_bind)


@pytest.fixture(scope="module")
def small_recovered(tmp_path_factory):
    shape, steps = GRAPHS["conv_stack"]
    g = GraphBuilder(shape, seed=5)
    steps(g)
    path = g.save(tmp_path_factory.mktemp("tr") / "conv_stack.onnx")
    rng = np.random.default_rng(2)
    calib = rng.standard_normal((32,) + shape).astype(np.float32)
    plan = fq.quantize(path, calib, group_size=4, search="range", recover=True, search_samples=16, progress=False)
    return path, plan, rng.standard_normal((3,) + shape).astype(np.float32)


def test_bias_rows_runtime_contract(small_recovered):
    """A plan with per-ratio bias corrections: main takes (x, counts, bias_row, ...); plan.runtime_args
    gives them, CompiledModel uses the same arrays, and the user's build is bit-exact with fq.compile."""
    path, plan, x = small_recovered
    assert plan.bias_correction
    vm, dev, mod = ex.build_with_my_pipeline(path, plan, "llvm")
    assert [str(p) for p in mod["main"].params][1:] == ["counts", "bias_row"]
    cm, want = _fq_outputs(path, plan, x)
    for r in RATIOS:
        cm.set_ratio(r)
        arrays = plan.runtime_arrays(r)
        assert arrays[0].dtype == np.int32 and arrays[0].shape == (plan.num_layers,)
        assert arrays[1].dtype == np.int32 and arrays[1].shape == (1,)
        cm_args = cm.runtime_args()
        for a, t in zip(arrays, cm_args[:2]):
            assert np.array_equal(a, t.numpy())
        assert np.array_equal(_run_vm(vm, dev, plan, x, r), want[r]), r
    assert plan.runtime_arrays(1.0)[1][0] == len(plan.bias_correction)      # last corrected level's row
    tensors = plan.runtime_args(0.5)
    assert all(isinstance(t, tvm.runtime.Tensor) for t in tensors) and len(tensors) == 2


def test_clear_errors(demo, small_recovered):
    path, plan, _ = demo
    mod = from_onnx(onnx.load(path))
    _, other, _ = small_recovered
    with pytest.raises(PlanError, match=r"plan layer 0 'conv2d_0' \(conv2d, 3->16.*in its place the module has "
                                        r"conv2d_0\(1->16"):
        fqt.FlexiQRewrite(other)(mod)
    with pytest.raises(PlanError, match="legalized to TIR.*before LegalizeOps"):
        fqt.FlexiQRewrite(plan)(relax.transform.LegalizeOps()(mod))
    with pytest.raises(ValueError, match="batch"):
        fqt.FlexiQRewrite(plan, batch_size=2)(relax.transform.BindSymbolicVars({"batch": 1})(mod))


def test_passes_follow_tvm_conventions(demo):
    path, plan, _ = demo
    p = fqt.FlexiQRewrite(plan)
    assert isinstance(p, tvm.transform.Pass) and p.info.name == "FlexiQRewrite" and p.info.opt_level == 0
    s = fqt.ScheduleFlexiQKernels("llvm")
    assert isinstance(s, tvm.transform.Pass) and s.info.name == "ScheduleFlexiQKernels"
    mod = s(p(from_onnx(onnx.load(path))))
    kernels = [f for _, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "flexiq.kernel" in f.attrs]
    assert kernels and all(int(f.attrs["op_pattern"]) == 8 for f in kernels)     # scheduled, opaque
    assert isinstance(fq.get_pipeline("llvm"), tvm.transform.Pass)


def test_geometry_record_travels_as_kernel_attributes(tmp_path):
    """The rewrite attaches each layer's ConvGeometry to its kernels; the NPU / CUDA layer extraction
    reads it from there and gets what parsing the kernels' TVMScript gives (strides, dilation,
    padding, scale), and the same record as the layer spec's."""
    from flexiq_tvm.quant.layer import ACT_SCALE_ATTR, GEOMETRY_ATTR, ConvGeometry
    from flexiq_tvm.schedules import cuda as cuda_sched
    from flexiq_tvm.targets.npu import codegen

    shape, steps = GRAPHS["grouped_dilated"]
    g = GraphBuilder(shape, seed=3)
    steps(g)
    path = g.save(tmp_path / "gd.onnx")
    model = fq.load_model(path)
    calib = np.random.default_rng(0).standard_normal((16,) + shape).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=4, search="range", recover=False, rounding="nearest",
                       search_samples=8, progress=False)
    mod = fqt.FlexiQRewrite(plan, batch_size=2)(from_onnx(onnx.load(path)))
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}

    def strip(f):
        return f.without_attr(GEOMETRY_ATTR).without_attr(ACT_SCALE_ATTR)

    for i, spec in enumerate(model.specs):
        L, _, _, _ = codegen.extract_layer(mod[f"{fqt.LAYER_FUNC_PREFIX}{i}"], {}, prims)
        want = spec.geometry(2)
        want.check()
        assert L.geometry == want, (spec.name, L.geometry, want)
        qf = next(f for n, f in prims.items() if n.startswith(f"flexiq_quantize_{i}_"))
        assert codegen._quantize_geometry(qf) == codegen._quantize_geometry(strip(qf))
        if spec.op == "conv2d":
            kf = next(f for n, f in prims.items() if n.startswith(f"flexiq_conv2d_{i}_"))
            assert codegen._conv_geometry(kf) == codegen._conv_geometry(strip(kf)) == \
                (want.SH, want.SW, want.DH, want.DW)
            assert ConvGeometry.from_attrs(kf.attrs[GEOMETRY_ATTR]) == want
            gs = cuda_sched.GemmShape(N=2, Hp=want.Hp, Wp=want.Wp, O=want.O, OH=want.OH, OW=want.OW, KH=want.KH,
                                      KW=want.KW, SH=want.SH, SW=want.SW, DH=want.DH, DW=want.DW)
            assert (gs.M, gs.Hp, gs.Wp) == (want.M, want.Hp, want.Wp) and isinstance(gs, ConvGeometry)
    assert any(s.dilation != (1, 1) for s in model.specs) and any(s.groups > 1 for s in model.specs)
