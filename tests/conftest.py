"""Shared fixtures: small ONNX graphs built in code, the shipped demo assets."""
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ASSETS = os.path.join(ROOT, "flexiq_tvm", "assets")


class GraphBuilder:
    """Builds a single-input float ONNX model node by node (weights as initializers)."""

    def __init__(self, input_shape, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.input_shape = tuple(input_shape)
        self.cur = "input"
        self.n = 0

    def _name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def const(self, arr, p="w"):
        name = self._name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        self.cur = out
        return out

    def conv(self, cin, cout, k=3, stride=1, pad=1, dilation=1, groups=1, bias=True):
        w = self.rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32)
        w *= self.rng.uniform(0.2, 1.5, (1, cin // groups, 1, 1)) / np.sqrt(cin // groups * k * k)
        ins = [self.cur, self.const(w)]
        if bias:
            ins.append(self.const(self.rng.standard_normal(cout) * 0.1, "b"))
        return self.node("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                         dilations=[dilation, dilation], group=groups)

    def relu(self):
        return self.node("Relu", [self.cur])

    def flatten(self):
        return self.node("Flatten", [self.cur], axis=1)

    def gap(self):
        return self.node("GlobalAveragePool", [self.cur])

    def gemm(self, cin, cout):
        w = self.rng.standard_normal((cout, cin)).astype(np.float32) / np.sqrt(cin)
        return self.node("Gemm", [self.cur, self.const(w), self.const(self.rng.standard_normal(cout) * 0.1, "b")],
                         transB=1)

    def matmul(self, cin, cout):
        w = self.rng.standard_normal((cin, cout)).astype(np.float32) / np.sqrt(cin)
        return self.node("MatMul", [self.cur, self.const(w)])

    def save(self, path, out_rank=None):
        out_rank = out_rank or (2 if self.nodes[-1].op_type in ("Gemm", "MatMul", "Flatten") else 4)
        g = helper.make_graph(self.nodes, "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *self.input_shape])],
                              [helper.make_tensor_value_info(self.cur, TensorProto.FLOAT, ["N"] + [None] * (out_rank - 1))],
                              self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        onnx.save(m, str(path))
        return str(path)


@pytest.fixture(scope="session", autouse=True)
def fresh_import_check_cache(tmp_path_factory):
    """Every test session runs the ONNX Runtime import check itself (its cache would otherwise
    survive from earlier runs on the same machine)."""
    old = os.environ.get("FLEXIQ_TVM_CACHE")
    os.environ["FLEXIQ_TVM_CACHE"] = str(tmp_path_factory.mktemp("flexiq_cache"))
    yield
    if old is None:
        os.environ.pop("FLEXIQ_TVM_CACHE", None)
    else:
        os.environ["FLEXIQ_TVM_CACHE"] = old


@pytest.fixture
def graph():
    return GraphBuilder


@pytest.fixture(scope="session")
def demo_paths():
    return {k: os.path.join(ASSETS, f) for k, f in
            [("model", "fashion_cnn.onnx"), ("calib", "fashion_calib.npz"), ("test", "fashion_test.npz")]}


# small graphs every target is checked on (input shape, builder steps)
GRAPHS = {
    "conv_stack": ((3, 12, 11), lambda g: (g.conv(3, 16, 3, 1, 1), g.relu(), g.conv(16, 24, 3, 2, 1), g.relu(),
                                           g.conv(24, 32, 1, 1, 0), g.gap(), g.flatten(), g.gemm(32, 10))),
    "depthwise": ((8, 10, 10), lambda g: (g.conv(8, 16, 1, 1, 0), g.relu(), g.conv(16, 16, 3, 1, 1, groups=16),
                                          g.relu(), g.conv(16, 16, 3, 2, 0, groups=16), g.conv(16, 8, 1, 1, 0))),
    "grouped_dilated": ((12, 9, 9), lambda g: (g.conv(12, 24, 3, 1, 2, dilation=2, groups=3), g.relu(),
                                               g.conv(24, 24, 3, 2, 1, groups=4, bias=False), g.flatten(),
                                               g.matmul(24 * 5 * 5, 20), g.relu(), g.gemm(20, 7))),
}


def counts_grid(plan, seed=0, n_random=2):
    """Per-layer counts at ratios 0, 0.5, 1 plus `n_random` seeded random configurations."""
    rng = np.random.default_rng(seed)
    grid = [plan.counts_for_ratio(r) for r in (0.0, 0.5, 1.0)]
    grid += [np.array([rng.integers(0, l.n_groups + 1) for l in plan.layers], np.int32) for _ in range(n_random)]
    return grid



def assert_builds_agree(deploy, plain, x, plan, ratios, seed):
    """Two artifacts of one plan (a target's deployment build and the plain one) give identical
    outputs, bit for bit, at each ratio and at each per-layer counts vector of
    ``counts_grid(plan, seed)``."""
    for r in ratios:
        plain.set_ratio(r), deploy.set_ratio(r)
        np.testing.assert_array_equal(deploy(x), plain(x), err_msg=f"ratio {r}")
    for counts in counts_grid(plan, seed=seed):
        plain.set_counts(counts), deploy.set_counts(counts)
        np.testing.assert_array_equal(deploy(x), plain(x), err_msg=f"counts {counts}")


def assert_taps_bit_exact(vm, refs, x, counts_list, extra_args=()):
    """Runs a tap build (main returns (out, x_0, y_0, ...)) at each counts vector and checks every
    layer's output bit for bit against its reference on the tapped input."""
    import tvm

    for counts in counts_list:
        counts = np.asarray(counts, np.int32)
        outs = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(counts), *extra_args)
        for i, ref in enumerate(refs):
            xin, yout = outs[1 + 2 * i].numpy(), outs[2 + 2 * i].numpy()
            expect = ref.forward(xin, counts[i])
            assert yout.dtype == expect.dtype
            assert np.array_equal(yout, expect), (ref.spec.name, counts.tolist(),
                                                  float(np.abs(yout - expect).max()))
