"""`load_model`: ONNX file, Relax IRModule or torch module -> a prepared float Relax model."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import relax

from ..errors import DataError, ModelError
from ..passes.fold_bn import FoldBatchNorm
from ..quant.layer import LayerSpec
from ..quant.plan import model_fingerprint
from .graph import static_shape
from .layers import FoundLayer, find_layers


@dataclass
class FloatModel:
    """A float32 Relax model with BatchNorm folded and its FlexiQ layers found."""

    mod: tvm.IRModule
    name: str
    source: str
    input_name: str
    input_shape: Tuple[int, ...]          # per sample (no batch axis)
    layers: List[FoundLayer] = field(default_factory=list)

    @property
    def specs(self) -> List[LayerSpec]:
        return [l.spec for l in self.layers]

    @property
    def layer_names(self) -> List[str]:
        return [l.spec.name for l in self.layers]

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.specs)

    def check_inputs(self, x, what: str = "input") -> np.ndarray:
        """A float32 batch of this model's input, or a DataError naming what is wrong."""
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise DataError(f"{what}: expected numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float32, copy=False)
        if arr.shape[1:] != self.input_shape or arr.ndim != len(self.input_shape) + 1:
            if arr.shape == self.input_shape:
                raise DataError(f"{what}: shape {arr.shape} has no batch axis; {self.name} expects (N, "
                                f"{', '.join(map(str, self.input_shape))})")
            raise DataError(f"{what}: shape {arr.shape} does not match {self.name}'s input "
                            f"{self.input_name!r} (N, {', '.join(map(str, self.input_shape))})")
        if arr.shape[0] == 0:
            raise DataError(f"{what}: empty batch")
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = int(np.argwhere(bad.reshape(arr.shape[0], -1).any(axis=1))[0, 0])
            raise DataError(f"{what}: contains NaN or inf (first in sample {idx}, {int(bad.sum())} values)")
        return np.ascontiguousarray(arr)


def prepare(mod: tvm.IRModule) -> tvm.IRModule:
    """Constant folding and BatchNorm folding, so that conv weights are final constants."""
    seq = tvm.transform.Sequential([relax.transform.FoldConstant(), FoldBatchNorm,
                                    relax.transform.FoldConstant(), relax.transform.CanonicalizeBindings()])
    return seq(mod)


def _from_onnx(path: str):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    if not os.path.exists(path):
        raise ModelError(f"{path}: no such model file")
    try:
        proto = onnx.load(path)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelError(f"{path}: malformed ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{path}: FlexiQ handles single-input models; this one has inputs {[i.name for i in inputs]}")
    try:
        mod = from_onnx(proto)
    except Exception as e:
        ops = sorted({n.op_type for n in proto.graph.node})
        raise ModelError(f"{path}: TVM's ONNX importer failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                         f"ops in the graph: {ops}") from None
    name = os.path.splitext(os.path.basename(path))[0]
    return mod, name, inputs[0].name


def _from_torch(module, example_inputs):
    try:
        import torch
        from tvm.relax.frontend.torch import from_exported_program
    except ImportError as e:
        raise ModelError(f"loading a torch module needs PyTorch: pip install 'flexiq-tvm[torch]' ({e})") from None
    if example_inputs is None:
        raise ModelError("load_model(torch_module, example_inputs): example_inputs is required to export the module")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t
                           for t in example_inputs)
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(module.eval(), example_inputs,
                             dynamic_shapes=({0: batch},) + ({},) * (len(example_inputs) - 1))
    mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    return mod, type(module).__name__, "input"


def load_model(source, example_inputs=None, params=None, name: Optional[str] = None) -> FloatModel:
    """Import a model for FlexiQ.

    `source`: path of an ONNX file; a `tvm.IRModule` whose `main` takes one float32 NCHW (or tokens)
    input (extra parameters are bound from `params`, a list of arrays in order); or a
    `torch.nn.Module` together with `example_inputs`.
    """
    if isinstance(source, (str, os.PathLike)):
        src = os.fspath(source)
        mod, default_name, input_name = _from_onnx(src)
    elif isinstance(source, tvm.IRModule):
        src, mod, default_name = "IRModule", source, "relax_model"
        mod = _bind_params(mod, params)
        input_name = str(mod["main"].params[0]) if "main" in [g.name_hint for g in mod.get_global_vars()] else "?"
    elif type(source).__module__.startswith("torch") or hasattr(source, "state_dict"):
        src = f"torch module {type(source).__name__}"
        mod, default_name, input_name = _from_torch(source, example_inputs)
    else:
        raise ModelError(f"load_model: cannot load a {type(source).__name__}; give an ONNX path, a tvm.IRModule "
                         "or a torch.nn.Module")
    if "main" not in [g.name_hint for g in mod.get_global_vars()]:
        raise ModelError(f"{src}: the module has no 'main' function")
    mod = prepare(mod)
    main = mod["main"]
    if len(main.params) != 1:
        raise ModelError(f"{src}: main must take exactly one input tensor after binding weights, "
                         f"got {len(main.params)} parameters")
    shape = static_shape(main.params[0])
    if shape is None:
        raise ModelError(f"{src}: the input must have a static shape apart from the batch axis")
    layers = find_layers(main)
    if not layers:
        warnings.warn(f"{src}: no quantizable layer found (conv2d or dense with constant weights)")
    return FloatModel(mod=mod, name=name or default_name, source=src, input_name=input_name,
                      input_shape=shape, layers=layers)


def _bind_params(mod: tvm.IRModule, params) -> tvm.IRModule:
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else None
    extra = main.params[num_input:] if num_input is not None else main.params[1:]
    if not extra:
        return mod
    if params is None:
        raise ModelError(f"IRModule main has weight parameters {[str(p) for p in extra]}: pass their values "
                         "as params=[...] (e.g. from relax.frontend.detach_params)")
    if isinstance(params, dict):
        params = params.get("main", params)
    if len(params) != len(extra):
        raise ModelError(f"IRModule main has {len(extra)} weight parameters but {len(params)} params were given")
    binding = {p: (v if isinstance(v, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(v)))
               for p, v in zip(extra, params)}
    new_main = main.bind_params(binding)
    mod = mod.clone() if hasattr(mod, "clone") else mod
    mod["main"] = new_main
    return mod
