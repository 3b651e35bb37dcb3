"""A numpy reference of the whole quantized model at any per-layer counts, for ONNX models.

ONNX's own reference evaluator runs the float parts of the graph; each node that flexiq-tvm
quantizes (Conv / Gemm / MatMul with a constant weight, matched in order to the FlexiQ layers) is
replaced by a custom op that computes the layer with `quant.reference.LayerReference`: the literal
per-group integer arithmetic. No TVM code runs here, so it checks the compiled model's wiring
(bias absorption, layer order, layouts) as well as its kernels. BatchNorm nodes are not supported
(the frontend folds them; export models with BatchNorm folded, as torch.onnx does in eval mode).
"""
from __future__ import annotations

from typing import List

import numpy as np

from ..errors import ModelError
from ..quant.plan import Plan
from ..quant.reference import reference_layers


def _const_names(graph):
    return {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def build_onnx_reference(path, model, plan: Plan):
    """Returns `run(x, counts) -> output` for the ONNX file `path` that `model` was loaded from."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    proto = onnx.load(path)
    if any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        raise ModelError(f"{path}: the ONNX reference does not run BatchNormalization nodes (fold them first)")
    consts = _const_names(proto.graph)
    if plan.bias_correction:
        raise ModelError("the ONNX reference runs plans without bias correction (quantize with recover=False)")
    refs = reference_layers(model.specs, plan)
    state = {"counts": np.zeros(len(refs), np.int32)}

    class FlexiQLayer(OpRun):
        op_domain = "flexiq"

        def _run(self, x, layer=None, with_bias=None):  # noqa: D401
            ref = refs[layer]
            acc = ref.accumulate(x, int(state["counts"][layer]))
            a = acc.astype(np.float32)
            view = (1, -1, 1, 1) if ref.spec.op == "conv2d" else (1,) * (a.ndim - 1) + (-1,)
            y = a * ref.scale.reshape(view)
            if with_bias:
                y = y + ref.bias.reshape(view)
            return (y,)

    nodes: List = []
    index = 0
    for n in proto.graph.node:
        is_layer = (n.op_type == "Conv" and len(n.input) >= 2 and n.input[1] in consts) or \
                   (n.op_type == "Gemm" and n.input[1] in consts) or \
                   (n.op_type == "MatMul" and n.input[1] in consts)
        if is_layer and index < len(refs):
            has_bias = len(n.input) >= 3 and n.input[2] != ""
            nodes.append(helper.make_node("FlexiQLayer", [n.input[0]], list(n.output), domain="flexiq",
                                          layer=index, with_bias=int(has_bias)))
            index += 1
        else:
            nodes.append(n)
    if index != len(refs):
        raise ModelError(f"{path}: found {index} quantizable ONNX nodes, the model has {len(refs)} FlexiQ layers")
    graph = helper.make_graph(nodes, proto.graph.name, proto.graph.input, proto.graph.output,
                              proto.graph.initializer)
    new = helper.make_model(graph, opset_imports=list(proto.opset_import) + [helper.make_opsetid("flexiq", 1)])
    sess = ReferenceEvaluator(new, new_ops=[FlexiQLayer])
    input_name = proto.graph.input[0].name

    def run(x, counts):
        state["counts"] = plan.check_counts(np.asarray(counts))
        return sess.run(None, {input_name: np.asarray(x, np.float32)})[0]

    return run
