"""`load_model`: ONNX file, Relax IRModule or torch module -> a prepared float Relax model."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax

from ..errors import DataError, ModelError
from ..passes.fold_bn import FoldBatchNorm
from ..quant.layer import LayerSpec
from ..quant.plan import model_fingerprint
from .graph import static_shape, tensor_dims
from .layers import FoundLayer, find_layers

log = logging.getLogger("flexiq_tvm")


@dataclass
class FloatModel:
    """A float32 Relax model with BatchNorm folded and its FlexiQ layers found."""

    mod: tvm.IRModule
    name: str
    source: str
    input_name: str
    input_shape: Tuple[int, ...]          # per sample (no batch axis)
    layers: List[FoundLayer] = field(default_factory=list)
    act_matmuls: List[str] = field(default_factory=list)   # activation x activation matmuls, kept float
    # the batch the graph itself pins (a fixed-batch export that could not be freed); None: any batch
    fixed_batch: Optional[int] = None
    pin_reason: str = ""
    # static re-import at a batch size, for graphs whose shape arithmetic folds only at a known batch
    at_batch: Optional[Callable[[int], tvm.IRModule]] = field(default=None, repr=False)
    import_check: Optional[dict] = None     # TVM vs ONNX Runtime FP32 (ort_check.py), when it ran
    _at_cache: Dict[int, Tuple[tvm.IRModule, List[FoundLayer]]] = field(default_factory=dict, repr=False)

    @property
    def specs(self) -> List[LayerSpec]:
        return [l.spec for l in self.layers]

    @property
    def layer_names(self) -> List[str]:
        return [l.spec.name for l in self.layers]

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.specs)

    def batch_for(self, requested: int) -> int:
        """The batch a stage runs at: what it asked for, unless the graph pins its own."""
        return int(self.fixed_batch) if self.fixed_batch else max(1, int(requested))

    def check_batch(self, batch: int, what: str = "batch_size") -> int:
        batch = int(batch)
        if batch < 1:
            raise ValueError(f"{what} must be >= 1, got {batch}")
        if self.fixed_batch and batch != self.fixed_batch:
            raise ModelError(f"{self.source}: the graph pins the batch at {self.fixed_batch} ({self.pin_reason}); "
                             f"{what}={batch} is not possible. Use {what}={self.fixed_batch} (inputs run in chunks "
                             f"of {self.fixed_batch}, the last one padded), or re-export the model with a dynamic "
                             "batch axis (torch.onnx.export(..., dynamic_axes={name: {0: 'N'}}))")
        return batch

    def at(self, batch: int) -> Tuple[tvm.IRModule, List[FoundLayer]]:
        """(module, layers) whose `main` runs `batch` samples. For most models this is `mod` itself
        (its batch axis is symbolic and each stage binds it); graphs that fold only at a concrete
        batch are re-imported at that batch, once per size."""
        batch = self.check_batch(batch)
        if self.at_batch is None:
            return self.mod, self.layers
        hit = self._at_cache.get(batch)
        if hit is None:
            mod = prepare(self.at_batch(batch))
            layers = find_layers(mod["main"], warn=False)
            if model_fingerprint([l.spec for l in layers]) != self.fingerprint:
                raise ModelError(f"{self.source}: the model's layers differ when imported at batch {batch} "
                                 "(its graph depends on the batch size)")
            hit = self._at_cache[batch] = (mod, layers)
        return hit

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


_ELEMWISE_TIR = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@relax.expr_functor.mutator
class _ElementwiseTIRToOps(relax.PyExprMutator):
    """`call_tir(maximum_k, (x, c))` -> `R.maximum(x, c)` (likewise minimum).

    TVM's ONNX importer lowers Clip (ReLU6 in MobileNetV2) to TE PrimFuncs named `maximum*` /
    `minimum*`. As Relax ops they keep `main` self-contained and let the sign analysis see that a
    ReLU6 output is non-negative (unsigned [0, 255] INT8 activations, METHOD section 1)."""

    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(_CALL_TIR)):
            return call
        gv, args = call.args[0], call.args[1]
        name = gv.name_hint.rstrip("0123456789_") if isinstance(gv, tvm.ir.GlobalVar) else None
        if name not in _ELEMWISE_TIR or not isinstance(args, relax.Tuple) or len(args.fields) != 2:
            return call
        a, b = args.fields
        if not (isinstance(a.ty, relax.TensorType) and isinstance(b.ty, relax.TensorType)):
            return call
        if a.ty.dtype != b.ty.dtype or str(a.ty.dtype) != str(call.ty.dtype):
            return call
        return _ELEMWISE_TIR[name](a, b)


def _elementwise_tir_to_ops(mod: tvm.IRModule) -> tvm.IRModule:
    if not any(isinstance(f, tvm.tirx.PrimFunc) for _, f in mod.functions_items()):
        return mod
    mut = _ElementwiseTIRToOps(mod)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            mut.builder_.update_func(gv, mut.visit_expr(f))
    out = mut.builder_.get()
    return relax.transform.DeadCodeElimination(["main"])(out)


def prepare(mod: tvm.IRModule) -> tvm.IRModule:
    """Constant folding and BatchNorm folding, so that conv weights are final constants; importer
    PrimFuncs for element-wise max/min (ONNX Clip) turned back into Relax ops."""
    mod = _elementwise_tir_to_ops(mod)
    seq = tvm.transform.Sequential([relax.transform.FoldConstant(), FoldBatchNorm,
                                    relax.transform.FoldConstant(), relax.transform.CanonicalizeBindings()])
    return seq(mod)


def _from_onnx(path: str, input_shape=None):
    from .onnx_import import import_onnx

    imported = import_onnx(path, input_shape=input_shape)
    for note in imported.notes:
        log.info("%s: %s", path, note)
    if imported.fixed_batch:
        log.warning("%s: the graph pins the batch at %d (%s): calibration, search and inference run in "
                    "chunks of %d, the last one padded", path, imported.fixed_batch, imported.pin_reason,
                    imported.fixed_batch)
    return imported


def _from_torch(module, example_inputs):
    """torch.export (batch axis dynamic) + TVM's `tvm.relax.frontend.torch.from_exported_program`.

    Weights become constants (`keep_params_as_input=False`) so that layer discovery sees them exactly
    as after an ONNX import. The module is put in eval mode. A batch-1 example is repeated to 2 for
    the export only: torch.export specializes a dynamic axis whose example size is 1.
    """
    try:
        import torch
        from tvm.relax.frontend.torch import from_exported_program
    except ImportError as e:
        raise ModelError(f"loading a torch module needs PyTorch: pip install 'flexiq-tvm[torch]' ({e})") from None
    if example_inputs is None:
        raise ModelError("load_model(torch_module, example_inputs): example_inputs is required to export the module")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if len(example_inputs) != 1:
        raise ModelError(f"FlexiQ handles single-input models; got {len(example_inputs)} example inputs")

    def as_tensor(t):
        t = t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t))
        return t.float() if t.is_floating_point() else t

    example = as_tensor(example_inputs[0]).detach()
    if example.ndim < 2:
        raise ModelError(f"torch example input of shape {tuple(example.shape)}: expected (batch, ...)")
    if example.shape[0] == 1:
        example = torch.cat([example, example])
    batch = torch.export.Dim("batch", min=1)
    module = module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ep = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            # Core-ATen decomposition except aten.linear: a Linear on (batch, tokens, features) stays
            # one 3-D matmul (decomposed, it is reshaped to (batch * tokens, features), which hides
            # the batch axis). Skipping decomposition altogether is not an option in TVM 0.27: its
            # converter reads aten.batch_norm's momentum as eps (and sets training=True).
            table = torch.export.default_decompositions()
            table.pop(torch.ops.aten.linear.default, None)
            ep = ep.run_decompositions(table)
            mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True,
                                        run_ep_decomposition=False)
    except Exception as e:
        raise ModelError(f"torch module {type(module).__name__}: export/import failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    return mod, type(module).__name__, "input"


def load_model(source, example_inputs=None, params=None, name: Optional[str] = None, input_shape=None,
               check: bool = True) -> FloatModel:
    """Import a model for FlexiQ.

    `source`: path of an ONNX file; a `tvm.IRModule` whose `main` takes one float32 NCHW (or tokens)
    input (extra parameters are bound from `params`, a list of arrays in order); or a
    `torch.nn.Module` together with `example_inputs`.
    `input_shape`: the per-sample input shape (no batch axis), required when the ONNX file leaves
    spatial or sequence dims dynamic (text detectors, fully convolutional nets); recorded in plans.
    `check`: compare the import with ONNX Runtime FP32 once per file (when onnxruntime is installed).
    """
    imported = None
    if isinstance(source, (str, os.PathLike)):
        src = os.fspath(source)
        imported = _from_onnx(src, input_shape)
        mod, default_name, input_name = imported.mod, imported.name, imported.input_name
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
        raise ModelError(f"{src}: the input must have a static shape apart from the batch axis "
                         "(an ONNX file takes input_shape=... / --input-shape)")
    if input_shape is not None and imported is None and tuple(int(d) for d in input_shape) != shape:
        raise ModelError(f"{src}: input_shape {tuple(input_shape)} does not match the module's input {shape}")
    act_matmuls: list = []
    layers = find_layers(main, act_matmuls=act_matmuls)
    if not layers:
        warnings.warn(f"{src}: no quantizable layer found (conv2d or dense with constant weights)")
    model = FloatModel(mod=mod, name=name or default_name, source=src, input_name=input_name,
                       input_shape=shape, layers=layers, act_matmuls=[str(v) for v in act_matmuls])
    batch_dim = tensor_dims(main.params[0])[0]
    if imported is None and isinstance(batch_dim, tvm.tirx.IntImm):
        model.fixed_batch = int(batch_dim)
        model.pin_reason = f"{src}'s main declares batch {int(batch_dim)}"
    if imported is not None:
        model.fixed_batch, model.pin_reason = imported.fixed_batch, imported.pin_reason
        if imported.at_batch is not None:
            model.at_batch = imported.at_batch
            batch = imported.fixed_batch or 1
            model._at_cache[batch] = (mod, layers)
        if check:
            from .ort_check import check_against_ort

            model.import_check = check_against_ort(imported, lambda b: model.at(b)[0], src)
            if model.import_check is not None and not model.import_check.get("cached"):
                log.info("%s: import checked against ONNX Runtime FP32: max |diff| %.3g", src,
                         model.import_check["max_abs_diff"])
    return model


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
