"""Dynamic extraction (Plan.dynamic): the compiled model against the numpy reference, bit for bit."""
import inspect

import numpy as np
import tvm

import flexiq_tvm as fq
from flexiq_tvm.api import compile_with_taps
from flexiq_tvm.calibrate.data import load_data
from flexiq_tvm.quant import Plan
from conftest import assert_taps_bit_exact, counts_grid
from flexiq_tvm.quant.reference import LayerReference


def _quantize(model, calib, **kw):
    """fq.quantize without any per-ratio bias correction (the numpy reference has none, and the
    comparison static vs dynamic should be about the shifts only)."""
    if "recover" in inspect.signature(fq.quantize).parameters:
        kw["recover"] = False
    plan = fq.quantize(model, calib, progress=False, **kw)
    if getattr(plan, "bias_correction", None):
        plan.bias_correction = {}
    return plan


def _check_layers_bit_exact(model, plan, x, counts_list, batch):
    vm = compile_with_taps(model, plan, batch_size=batch)
    refs = [LayerReference(s, p, dynamic=plan.dynamic) for s, p in zip(model.specs, plan.layers)]
    assert_taps_bit_exact(vm, refs, x, counts_list)
    return vm, refs


def test_dynamic_random_graph_bit_exact(tmp_path, graph):
    shape = (6, 10, 9)
    g = graph(shape, seed=7)
    g.conv(6, 16, 3, 1, 1)
    g.relu()
    g.conv(16, 16, 3, 2, 1, groups=4)
    g.relu()
    g.conv(16, 24, 1, 1, 0)
    g.flatten()
    g.gemm(24 * 5 * 5, 12)
    path = g.save(tmp_path / "dyn.onnx")
    model = fq.load_model(path)
    rng = np.random.default_rng(2)
    calib = rng.standard_normal((16,) + shape).astype(np.float32)
    plan = _quantize(model, calib, group_size=4, search="range")
    plan.dynamic = True
    plan = Plan.loads(plan.dumps())          # the flag survives the plan file
    assert plan.dynamic
    # samples with very different ranges, so that per-sample shifts differ within the batch
    x = rng.standard_normal((3,) + shape).astype(np.float32) * np.float32([[[[2.0]]], [[[0.05]]], [[[0.5]]]])
    grid = counts_grid(plan, seed=4)
    vm, refs = _check_layers_bit_exact(model, plan, x, grid, batch=3)
    # the dynamic build really is dynamic: it differs from the static reference somewhere
    counts = plan.counts_for_ratio(1.0)
    outs = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(counts))
    assert any(not np.array_equal(outs[2 + 2 * i].numpy(), r.forward(outs[1 + 2 * i].numpy(), counts[i], dynamic=False))
               for i, r in enumerate(refs))
    # a sample's result does not depend on the rest of the batch
    x2 = x.copy()
    x2[1:] *= 20
    y1 = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(counts))[0].numpy()
    y2 = vm["main"](tvm.runtime.tensor(x2), tvm.runtime.tensor(counts))[0].numpy()
    assert np.array_equal(y1[0], y2[0])


def test_dynamic_demo_accuracy_reported(demo_paths, capsys):
    model = fq.load_model(demo_paths["model"])
    # range search, no bias correction: search_samples only sizes plan.meta's per-layer error report
    # (the schedule is the value-range order), so 2 samples give the same plan as the default 512
    plan = _quantize(model, demo_paths["calib"], search="range", search_samples=2)
    x, labels = load_data(demo_paths["test"], model)
    x, labels = x[:1000], np.asarray(labels[:1000])
    acc = {}
    for dynamic in (False, True):
        plan.dynamic = dynamic
        cm = fq.compile(model, plan, batch_size=100)
        for r in (0.5, 0.75):
            cm.set_ratio(r)
            acc[(dynamic, r)] = float(np.mean(cm(x).argmax(1) == labels))
    with capsys.disabled():
        for r in (0.5, 0.75):
            print(f"\n[demo top-1, first 1000 images, range search] ratio {r}: "
                  f"static {acc[(False, r)]:.4f}  dynamic {acc[(True, r)]:.4f}")
    assert all(a > 0.5 for a in acc.values())
