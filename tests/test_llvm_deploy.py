"""The llvm deployment rewrites (targets/llvm.py `prepare`): the RGB stem on VNNI, stride-2
depthwise kernels over column pairs, narrow stride-1 ones over the flattened plane, 1x1 convs
writing the next layer's codes, residual adds and ReLU / ReLU6 folded into the layer epilogues,
weights lowered once per ratio change. Each must leave the artifact's outputs identical, bit for
bit, to the plain build at every ratio."""
import numpy as np
import pytest
import tvm
from tvm import relax

import flexiq_tvm as fq
from flexiq_tvm.passes.flexiq_rewrite import flexiq_rewrite
from flexiq_tvm.passes.hoist_weights import LOWER_WEIGHTS_FUNC
from flexiq_tvm.runtime import compiled
from flexiq_tvm.schedules.compute import KERNEL_ATTR
from flexiq_tvm.targets import get_target
from conftest import assert_builds_agree


def _mobile_block(g):
    """A MobileNetV2-like stack: pointwise expand + ReLU6 (ONNX Clip), stride-2 depthwise + ReLU6,
    linear projection, a residual block, a ReLU whose input is also read by a residual add (must
    not be fused), pooling and a classifier."""
    def relu6():
        return g.node("Clip", [g.cur, g.const(np.float32(0.0), "lo"), g.const(np.float32(6.0), "hi")])

    g.conv(3, 16, 3, 2, 1), relu6()
    g.conv(16, 48, 1, 1, 0), relu6()
    g.conv(48, 48, 3, 2, 1, groups=48), relu6()
    x = g.conv(48, 24, 1, 1, 0)
    g.conv(24, 72, 1, 1, 0), g.relu()
    g.conv(72, 72, 3, 1, 1, groups=72), relu6()
    y = g.conv(72, 24, 1, 1, 0)
    g.node("Add", [x, y])
    g.gap(), g.flatten(), g.gemm(24, 10)


@pytest.fixture(scope="module")
def mobile(tmp_path_factory):
    from conftest import GraphBuilder

    g = GraphBuilder((3, 32, 32), seed=3)
    _mobile_block(g)
    path = g.save(tmp_path_factory.mktemp("deploy") / "mobile.onnx")
    model = fq.load_model(path)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=True, progress=False)
    return model, plan


def test_prepared_module_structure(mobile):
    model, plan = mobile
    mod = get_target("llvm").prepare(flexiq_rewrite(model.mod, model.layers, plan, 2))
    main = mod["main"]
    ops = [b.value.op.name for blk in main.body.blocks for b in blk.bindings
           if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
    # the ReLU6s (Clip) and the ReLU after a layer are in the epilogues; the ReLU after the
    # residual add is not a layer's (it stays)
    assert not any(o in ("relax.clip", "relax.minimum") for o in ops), ops
    # the residual add is in the second projection's epilogue (passes.fuse_residual)
    assert "relax.add" not in ops, ops
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
               and f.attrs is not None and KERNEL_ATTR in f.attrs}
    acts = [f for f in kernels.values() if "flexiq.act_lo" in f.attrs]
    assert len(acts) == 5
    assert sum(float(f.attrs["flexiq.act_hi"]) == 6.0 for f in acts if str(f.attrs["flexiq.act_hi"]) != "none") == 4
    # the RGB stem runs on VNNI (its 3 channels padded to 4) from bytes the quantize kernel packed
    stem = [f for f in kernels.values() if str(f.attrs[KERNEL_ATTR]) == "conv2d_int8"
            and int(f.attrs["flexiq.in_channels"]) == 3]
    assert len(stem) == 1 and str(stem[0].attrs["flexiq.layout"]) == "OIHWo4i"
    assert int(stem[0].attrs["flexiq.packed_input"])
    # the stride-2 depthwise conv reads its input as uint16 column pairs, the stride-1 one over
    # 8-wide rows as one flattened plane (passes.depthwise_input_view)
    pairs = [f for f in kernels.values() if int(f.attrs.get("flexiq.pair_cols", 0))]
    assert len(pairs) == 1 and int(pairs[0].attrs["flexiq.groups"]) == 48
    flat = [f for f in kernels.values() if int(f.attrs.get("flexiq.flat_plane", 0))]
    assert len(flat) == 1 and int(flat[0].attrs["flexiq.groups"]) == 72
    assert not any(int(f.attrs.get("flexiq.full_rows", 0)) for f in kernels.values())
    # both 1x1 expansions (16x16 and 8x8 planes: spatial lanes) write the depthwise convs' codes
    # (passes.fuse_requant); no float map goes from them to a quantize kernel
    res = [f for f in kernels.values() if int(f.attrs.get("flexiq.residual", 0))]
    assert len(res) == 1 and int(res[0].attrs["flexiq.in_channels"]) == 72
    rq = {n: f for n, f in kernels.items() if "flexiq.requant_scale" in f.attrs}
    assert len(rq) == 2 and all(str(f.attrs["flexiq.layout"]) == "OIHWo4i" for f in rq.values()), list(kernels)
    assert sorted(int(f.attrs["flexiq.requant_layer_index"]) for f in rq.values()) == [2, 5]
    # the weights are lowered by flexiq_lower_weights only, and main takes them as its last input
    assert LOWER_WEIGHTS_FUNC == compiled.LOWER_WEIGHTS_FUNC
    lower_fn = mod[LOWER_WEIGHTS_FUNC]
    assert len(lower_fn.ret_ty.fields) == plan.num_layers
    assert main.params[-1].name == "flexiq_weights"
    # the layer functions are inlined: main calls the kernels itself (one VM frame per call)
    assert not any(gv.name_hint.startswith("flexiq_layer_") for gv in mod.get_global_vars())
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function) and gv.name_hint != LOWER_WEIGHTS_FUNC:
            called = [mod[b.value.args[0]] for blk in f.body.blocks for b in blk.bindings
                      if isinstance(b.value, relax.Call) and b.value.op.same_as(tvm.ir.Op.get("relax.call_tir"))]
            assert not any(str(k.attrs.get(KERNEL_ATTR, "")) == "lower_weight" for k in called if k.attrs), gv


def test_deploy_build_bit_exact_with_plain_build(mobile):
    model, plan = mobile
    plain = fq.compile(model, plan, batch_size=2, hoist_weights=False, fuse_activations=False,
                       kernel_variants=False, inline_layers=False)
    deploy = fq.compile(model, plan, batch_size=2)
    x = np.random.default_rng(5).standard_normal((5, 3, 32, 32)).astype(np.float32) * 2
    assert_builds_agree(deploy, plain, x, plan, (0.0, 0.25, 0.5, 1.0), seed=3)



def test_depthwise_convs_write_packed_words_when_their_maps_are_large(mobile, monkeypatch):
    """passes.fuse_requant: a depthwise conv whose float map would leave the cache (at least
    PACKED_MIN_MAP_BYTES) writes the next 1x1 conv's packed words itself. Under the threshold (this
    model's maps at batch 2) it does not; with the threshold at 0 both depthwise convs (column pairs
    and the flattened plane) do, no quantize kernel is left before either projection, and the build
    stays bit-exact with the plain one at every ratio and random counts."""
    from flexiq_tvm.passes import fuse_requant

    model, plan = mobile

    def packed(batch):
        """(the depthwise kernels writing packed words, the layers whose packed input a quantize
        kernel still writes)"""
        mod = get_target("llvm").prepare(flexiq_rewrite(model.mod, model.layers, plan, batch))
        kernels = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
                   and f.attrs is not None and KERNEL_ATTR in f.attrs]
        readers = {int(f.attrs["flexiq.layer_index"]) for f in kernels
                   if str(f.attrs[KERNEL_ATTR]) == "quantize_act" and str(f.attrs["flexiq.layout"]) == "NCHW4c"}
        return [f for f in kernels if "flexiq.requant_pack" in f.attrs], readers

    fused, readers = packed(2)
    assert fused == [] and {3, 6} <= readers, readers     # the two projections' inputs
    monkeypatch.setattr(fuse_requant, "PACKED_MIN_MAP_BYTES", 0)
    fused, readers = packed(2)
    assert sorted(int(f.attrs["flexiq.groups"]) for f in fused) == [48, 72]
    assert {bool(f.attrs.get("flexiq.pair_cols", False)) for f in fused} == {True, False}
    assert all([int(v) for v in f.attrs["flexiq.requant_pack"]] == [1, int(f.attrs["flexiq.groups"])] for f in fused)
    assert not {3, 6} & readers, readers
    plain = fq.compile(model, plan, batch_size=2, hoist_weights=False, fuse_activations=False,
                       kernel_variants=False, inline_layers=False)
    deploy = fq.compile(model, plan, batch_size=2)
    x = np.random.default_rng(9).standard_normal((4, 3, 32, 32)).astype(np.float32) * 2
    assert_builds_agree(deploy, plain, x, plan, (0.0, 0.25, 0.5, 0.75, 1.0), seed=4)


def test_stride2_depthwise_over_an_odd_padded_width(tmp_path):
    """A 29x29 input: the stride-2 depthwise conv's padded input is 17 columns wide, so its
    quantize kernel writes one more zero column to make whole uint16 words; the deployment build
    stays bit-exact with the plain one."""
    from conftest import GraphBuilder

    g = GraphBuilder((3, 29, 29), seed=4)
    _mobile_block(g)
    model = fq.load_model(g.save(tmp_path / "odd.onnx"))
    calib = np.random.default_rng(1).standard_normal((8, 3, 29, 29)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=True, progress=False)
    mod = get_target("llvm").prepare(flexiq_rewrite(model.mod, model.layers, plan, 1))
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
               and f.attrs is not None and KERNEL_ATTR in f.attrs}
    pairs = [f for f in kernels.values() if int(f.attrs.get("flexiq.pair_cols", 0))]
    assert len(pairs) == 1 and int(pairs[0].attrs["flexiq.in_width"]) == 17
    # (the widened codes are written by the 15x15 expansion conv itself: passes.fuse_requant)
    widened = [f for f in kernels.values() if [int(v) for v in f.attrs.get("flexiq.requant_pad", [])] == [1, 1, 1, 2]]
    assert len(widened) == 1 and str(widened[0].attrs[KERNEL_ATTR]) == "conv2d_int8"
    plain = fq.compile(model, plan, batch_size=1, hoist_weights=False, fuse_activations=False,
                       kernel_variants=False, inline_layers=False)
    deploy = fq.compile(model, plan, batch_size=1)
    x = np.random.default_rng(7).standard_normal((3, 3, 29, 29)).astype(np.float32) * 2
    for r in (0.0, 0.5, 1.0):
        plain.set_ratio(r), deploy.set_ratio(r)
        np.testing.assert_array_equal(deploy(x), plain(x), err_msg=f"ratio {r}")


def test_weights_lowered_once_per_ratio(mobile, tmp_path):
    model, plan = mobile
    cm = fq.compile(model, plan, batch_size=1)
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y0 = cm(x)                                  # the VM exists from here on
    cm.set_ratio(0.5)
    assert cm.last_lowering_s > 0               # a new ratio: lowered inside the switch
    y5 = cm(x)
    assert not np.array_equal(y0, y5)
    cm.set_ratio(0.0)
    assert cm.last_lowering_s == 0              # recently used: a lookup
    np.testing.assert_array_equal(cm(x), y0)
    cm.set_ratio(0.5)
    assert cm.last_lowering_s == 0
    np.testing.assert_array_equal(cm(x), y5)
    # more distinct ratios than the cache holds: still right when an evicted one comes back
    for i in range(compiled._WEIGHT_CACHE + 2):
        cm.set_counts(np.minimum(np.full(plan.num_layers, i % 3), [l.n_groups for l in plan.layers]))
        cm(x)
    cm.set_ratio(0.5)
    np.testing.assert_array_equal(cm(x), y5)
    # the exported artifact carries the lowering function
    path = tmp_path / "m.so"
    cm.export(path)
    loaded = fq.load_artifact(path)
    loaded.set_ratio(0.5)
    np.testing.assert_array_equal(loaded(x), y5)


@pytest.mark.parametrize("batch", [16, 3])
def test_dense_layers_run_as_vnni_convs(tmp_path, batch):
    """passes.dense_on_vnni: dense layers with O a multiple of 8 become 1x1 VNNI convs over the
    transposed batch (16 rows: spatial lanes; 3: channel lanes), the 10-way head keeps dense_int8;
    outputs identical to the plain build at every ratio and at random counts."""
    from conftest import GraphBuilder

    g = GraphBuilder((3, 4, 4), seed=6)
    g.flatten(), g.gemm(48, 32), g.relu(), g.gemm(32, 24), g.gemm(24, 10)
    model = fq.load_model(g.save(tmp_path / "mlp.onnx"))
    calib = np.random.default_rng(2).standard_normal((16, 3, 4, 4)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=True, progress=False)
    mod = get_target("llvm").prepare(flexiq_rewrite(model.mod, model.layers, plan, batch))
    kinds = [str(f.attrs[KERNEL_ATTR]) for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)
             and f.attrs is not None and KERNEL_ATTR in f.attrs]
    convs = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
             and str(f.attrs.get(KERNEL_ATTR, "")) == "conv2d_int8"]
    assert kinds.count("dense_int8") == 1 and len(convs) == 2, kinds
    assert all(str(f.attrs["flexiq.layout"]) == "OIHWo4i" and int(f.attrs["flexiq.packed_input"]) for f in convs)
    assert sorted(int(f.attrs.get("flexiq.spatial_lanes", 0)) for f in convs) == [int(batch % 16 == 0)] * 2
    assert sum("flexiq.act_lo" in f.attrs for f in convs) == 1        # the ReLU stays in the epilogue
    plain = fq.compile(model, plan, batch_size=batch, hoist_weights=False, fuse_activations=False,
                       kernel_variants=False, inline_layers=False)
    deploy = fq.compile(model, plan, batch_size=batch)
    x = np.random.default_rng(8).standard_normal((batch + 1, 3, 4, 4)).astype(np.float32) * 2
    assert_builds_agree(deploy, plain, x, plan, (0.0, 0.5, 1.0), seed=4)
