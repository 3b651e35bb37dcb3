"""ONNX files as users export them -> a Relax module TVM can import, with the batch axis understood.

TVM 0.27's ONNX importer wants a graph whose shapes are known: it fails on shape subgraphs
(Shape -> Gather -> arithmetic -> Concat feeding Reshape or Pad), on scalars that such subgraphs turn
into float64 (`x / head_dim ** 0.5`), and on inputs whose spatial dims are symbolic. Exports in the
wild are full of these, and most carry a fixed batch (torch.onnx.export without `dynamic_axes`).

So before TVM sees a graph it is made static where it can be:
  1. the input's per-sample dims are fixed (from the file, or from the user's `input_shape`);
  2. shape arithmetic is folded by onnxslim (chosen over onnx-simplifier: pure Python, so it
     installs wherever onnx does, and it folds more here: a torch-exported attention block goes from
     83 to 35 nodes with onnxslim, 57 with onnx-simplifier, which also needs a compiled wheel and
     ONNX Runtime for its folding). ONNX's own shape inference alone does not fold values;
  3. the batch axis is freed where the graph allows it: a fixed-batch export's Reshape constants
     that carry the batch are rewritten to infer it, and the result is checked against ONNX Runtime
     running the original file, sample for sample. When that check cannot pass (or ONNX Runtime is
     not installed), the batch stays what the file pins, and the nodes that pin it are named.

The import is tried in the order that keeps the graph closest to the file: the file as it is (a
clean dynamic-batch export, as before), then the folded graph with a symbolic batch, then the
folded graph re-imported at each concrete batch size a stage asks for.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import relax

from ..errors import ModelError

BATCH_SYMBOL = "N"


@dataclass
class ImportedOnnx:
    """What `import_onnx` found: the module to use, and how the batch axis behaves."""

    mod: tvm.IRModule                      # the module at `canonical_batch` (or with a symbolic batch)
    name: str
    input_name: str
    sample_shape: Tuple[int, ...]
    fixed_batch: Optional[int]             # the batch the graph pins; None: any batch
    pin_reason: str = ""                   # which nodes pin it
    at_batch: Optional[Callable[[int], tvm.IRModule]] = None   # static re-import at a batch size
    strategy: str = "as-is"                # as-is | folded-symbolic | folded-static | pinned
    notes: List[str] = field(default_factory=list)
    proto: object = None                   # the original ModelProto (for the ONNX Runtime check)
    declared_batch: Optional[int] = None   # the batch the file declares (ONNX Runtime runs it so)


# ---- reading --------------------------------------------------------------------------------------
def read_onnx(path: str):
    import onnx

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
    return proto


def graph_input(proto, path: str):
    """The single real input (initializers listed as graph inputs, as older exporters do, are weights)."""
    from onnx import TensorProto

    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{path}: FlexiQ handles single-input models; this one has inputs {[i.name for i in inputs]}")
    vi = inputs[0]
    elem = vi.type.tensor_type.elem_type
    if elem != TensorProto.FLOAT:
        raise ModelError(f"{path}: input {vi.name!r} is {TensorProto.DataType.Name(elem)}; FlexiQ takes float32 "
                         "inputs (images or token embeddings)")
    return vi


def declared_dims(vi) -> List[Optional[int]]:
    """Input dims as the file declares them: an int, or None where symbolic / unknown (some exporters
    write -1 or 0 for 'any')."""
    if not vi.type.tensor_type.HasField("shape"):
        return []
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def resolve_sample_shape(dims: Sequence[Optional[int]], input_shape, path: str, input_name: str) -> Tuple[int, ...]:
    """Per-sample input shape: the file's, with the user's `input_shape` filling (and checked against)
    the declared dims."""
    if not dims:
        if input_shape is None:
            raise ModelError(f"{path}: input {input_name!r} declares no shape; pass input_shape=(C, H, W) "
                             "(--input-shape C,H,W)")
        return tuple(int(d) for d in input_shape)
    declared = list(dims[1:])
    show = "(N, " + ", ".join("?" if d is None else str(d) for d in declared) + ")"
    if input_shape is None:
        if any(d is None for d in declared):
            names = {1: "T", 2: "TD", 3: "CHW"}.get(len(declared), "?" * len(declared))
            hint = ", ".join(n if d is None else str(d) for n, d in zip(names, declared))
            raise ModelError(f"{path}: input {input_name!r} has dynamic dims {show}; give the shape to "
                             f"compile for: input_shape=({hint}) in load_model, or --input-shape "
                             f"{hint.replace(', ', ',')} on the command line")
        return tuple(int(d) for d in declared)
    want = tuple(int(d) for d in input_shape)
    if len(want) != len(declared) or any(d is not None and d != w for d, w in zip(declared, want)):
        raise ModelError(f"{path}: input_shape {want} does not fit input {input_name!r} declared as {show} "
                         "(per-sample dims, no batch axis)")
    if any(w < 1 for w in want):
        raise ModelError(f"{path}: input_shape {want} has a dim below 1")
    return want


# ---- graph edits ----------------------------------------------------------------------------------
def with_input_dims(proto, input_name: str, dims: Sequence) -> object:
    """A copy with the input's dims set (ints, or a str for a symbolic dim); every other tensor's
    declared shape is dropped so that shape inference starts from the new input."""
    import onnx

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for vi in p.graph.input:
        if vi.name == input_name:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in dims:
                dim = shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = int(d)
    del p.graph.value_info[:]
    for out in p.graph.output:
        if out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.ClearField("shape")
    return p


def fold(proto, path: str = "model"):
    """Shape arithmetic folded into constants (onnxslim); the graph unchanged if folding fails."""
    try:
        import onnxslim
    except ImportError:                   # a declared dependency; keep working without it
        warnings.warn("onnxslim is not installed: ONNX shape subgraphs are not folded before import")
        return proto
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return onnxslim.slim(proto)
    except Exception as e:                # noqa: BLE001  (a folding failure is not the user's problem)
        warnings.warn(f"{path}: onnxslim could not fold the graph ({type(e).__name__}: {str(e)[:200]}); "
                      "importing it unfolded")
        return proto


def _const_tensor(proto, name: str):
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return init, numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return a.t, numpy_helper.to_array(a.t)
    return None, None


def batch_reshapes(proto, batch: int) -> List[Tuple[object, np.ndarray]]:
    """Reshape nodes whose constant target shape starts with the export's batch size: what pins a
    fixed-batch export to its batch."""
    out = []
    for node in proto.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        _, shape = _const_tensor(proto, node.input[1])
        if shape is not None and shape.ndim == 1 and shape.size >= 1 and int(shape[0]) == batch:
            out.append((node, shape))
    return out


def batch_multiple_reshapes(proto, batch: int) -> List[Tuple[object, np.ndarray]]:
    """Reshape nodes whose constant leading entry is a multiple of the batch (batch x tokens folded
    into rows): the usual reason a batch cannot be freed."""
    out = []
    for node in proto.graph.node:
        if node.op_type == "Reshape" and len(node.input) >= 2:
            _, shape = _const_tensor(proto, node.input[1])
            if (shape is not None and shape.ndim == 1 and shape.size >= 1 and int(shape[0]) > batch
                    and int(shape[0]) % batch == 0):
                out.append((node, shape))
    return out


def free_batch_reshapes(proto, batch: int):
    """(copy, names): the batch entry of every pinning Reshape made inferred (-1, or 0 = 'copy the
    input's leading dim' where -1 is already taken). Only a candidate: ONNX Runtime decides whether
    the result computes the same function."""
    import onnx
    from onnx import numpy_helper

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    changed = []
    for node, shape in batch_reshapes(p, batch):
        new = shape.copy()
        new[0] = 0 if (-1 in shape[1:]) else -1
        tensor, _ = _const_tensor(p, node.input[1])
        tensor.CopyFrom(numpy_helper.from_array(new.astype(shape.dtype), tensor.name))
        changed.append(node.name or node.output[0])
    return p, changed


def pinning_description(proto, batch: int) -> str:
    nodes = (batch_multiple_reshapes(proto, batch) if batch > 1 else []) + batch_reshapes(proto, batch)
    if not nodes:
        return f"the graph's shape computations fix the batch at {batch}"
    shown = ", ".join(f"{n.op_type} {n.name or n.output[0]!r} -> {list(map(int, s))}" for n, s in nodes[:3])
    more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
    return f"constant batch {batch} in {shown}{more}"


# ---- ONNX Runtime ---------------------------------------------------------------------------------
def ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def ort_session(proto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_run(sess, x: np.ndarray, chunk: Optional[int] = None) -> List[np.ndarray]:
    """All outputs for x, run in chunks of `chunk` samples (a file that pins its batch), padded."""
    name = sess.get_inputs()[0].name
    if chunk is None:
        return [np.asarray(o) for o in sess.run(None, {name: x})]
    parts: List[List[np.ndarray]] = []
    for s in range(0, x.shape[0], chunk):
        c = x[s:s + chunk]
        n = c.shape[0]
        if n < chunk:
            c = np.concatenate([c, np.zeros((chunk - n,) + c.shape[1:], c.dtype)])
        parts.append([np.asarray(o)[:n] for o in sess.run(None, {name: c})])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def outputs_close(a: Sequence[np.ndarray], b: Sequence[np.ndarray], rtol: float = 1e-3) -> Tuple[bool, int, float]:
    """(all close, index of the first output that differs or -1, max abs diff), relative to each
    reference output's magnitude: float reassociation moves deep nets' outputs by ~1e-6 of scale."""
    worst = 0.0
    if len(a) != len(b):
        return False, min(len(a), len(b)), float("inf")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return False, i, float("inf")
        d = float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0
        worst = max(worst, d)
        if not d <= rtol * max(1.0, float(np.max(np.abs(y))) if y.size else 1.0):
            return False, i, d
    return True, -1, worst


def random_inputs(batch: int, sample_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch,) + tuple(sample_shape)).astype(np.float32)


# ---- TVM --------------------------------------------------------------------------------------------
class OnnxImportError(ModelError):
    def __init__(self, message: str, op: Optional[str] = None, node: Optional[str] = None):
        super().__init__(message)
        self.op, self.node = op, node


def to_relax(proto, path: str) -> tvm.IRModule:
    """TVM's importer, with the failing node's op type and name in the error (TVM only prints the op
    type, to stdout)."""
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    current: Dict[str, Optional[str]] = {"op": None, "node": None}
    original = frontend.ONNXGraphImporter._convert_operator

    def tracking(self, op_name, inputs, attrs, opset):
        current["op"] = op_name
        current["node"] = (attrs.get("tvm_custom") or {}).get("name")
        return original(self, op_name, inputs, attrs, opset)

    frontend.ONNXGraphImporter._convert_operator = tracking
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return frontend.from_onnx(proto)
    except Exception as e:
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        if current["op"] is None:
            # ops TVM has no converter for are refused before conversion starts: name the first one
            words = set(str(e).replace(",", " ").replace("'", " ").replace("[", " ").replace("]", " ").split())
            node = next((n for n in proto.graph.node if n.op_type in words), None)
            if node is not None:
                current["op"], current["node"] = node.op_type, node.name or node.output[0]
        where = f" at {current['op']} node {current['node']!r}" if current["op"] else ""
        raise OnnxImportError(f"{path}: TVM's ONNX importer failed{where} ({type(e).__name__}: {msg})",
                              op=current["op"], node=current["node"]) from None
    finally:
        frontend.ONNXGraphImporter._convert_operator = original


def _free_vars(expr) -> set:
    return {str(v) for v in tvm.tirx.analysis.undefined_vars(expr)} if not isinstance(expr, tvm.tirx.IntImm) else set()


def is_clean(mod: tvm.IRModule) -> bool:
    """Every tensor in `main` has a known shape whose only symbol is the input's batch axis, which the
    output keeps: the module can be bound to any batch."""
    main = mod["main"]
    dims = list(main.params[0].ty.shape.values) if main.params[0].ty.shape is not None else []
    if not dims or isinstance(dims[0], tvm.tirx.IntImm):
        return False
    batch = str(dims[0])
    from .graph import bindings

    for b in bindings(main):
        ty = b.var.ty
        if isinstance(ty, relax.TensorType):
            if ty.shape is None:
                return False
            try:
                values = list(ty.shape.values)
            except AttributeError:
                return False
            if any(not _free_vars(d) <= {batch} for d in values):
                return False
        elif isinstance(ty, relax.ShapeType):
            # a shape computed from the batch symbol (reshape targets) is fine; an unknown one is not
            if ty.values is None or any(not _free_vars(d) <= {batch} for d in ty.values):
                return False
        elif isinstance(ty, tvm.ir.PrimType):
            return False
    out = main.body.body.ty if hasattr(main.body, "body") else main.ret_ty
    outs = out.fields if isinstance(out, relax.TupleType) else [out]
    return all(isinstance(o, relax.TensorType) and o.shape is not None and o.ndim >= 1
               and str(o.shape.values[0]) == batch for o in outs)


# ---- the import ----------------------------------------------------------------------------------
class _StaticImport:
    """A graph at concrete batch sizes: folded once per batch (`proto`, which the batch check, the
    import and the pinning report share) and imported when called (`FloatModel.at` keeps the
    prepared module per batch)."""

    def __init__(self, graph, input_name: str, sample: Tuple[int, ...], path: str):
        self.graph, self.input_name, self.sample, self.path = graph, input_name, sample, path
        self._protos: Dict[int, object] = {}

    def proto(self, batch: int):
        batch = int(batch)
        if batch not in self._protos:
            self._protos[batch] = fold(with_input_dims(self.graph, self.input_name, [batch, *self.sample]), self.path)
        return self._protos[batch]

    def __call__(self, batch: int) -> tvm.IRModule:
        return to_relax(self.proto(batch), self.path)


def import_onnx(path: str, input_shape=None) -> ImportedOnnx:
    proto = read_onnx(path)
    vi = graph_input(proto, path)
    input_name = vi.name
    dims = declared_dims(vi)
    sample = resolve_sample_shape(dims, input_shape, path, input_name)
    fixed = dims[0] if dims else None
    name = os.path.splitext(os.path.basename(path))[0]
    have_ort = ort_available()
    errors: List[OnnxImportError] = []

    def attempt(fn):
        try:
            return fn()
        except OnnxImportError as e:
            errors.append(e)
            return None

    def result(mod, **kw):
        return ImportedOnnx(mod=mod, name=name, input_name=input_name, sample_shape=sample, proto=proto,
                            declared_batch=fixed, **kw)

    # 1. the file as it is: a clean dynamic-batch export imports unchanged
    if fixed is None and all(d is not None for d in dims[1:]):
        mod = attempt(lambda: to_relax(proto, path))
        if mod is not None and is_clean(mod):
            return result(mod, fixed_batch=None, strategy="as-is")

    # a fixed-batch export: its Reshape constants that carry the batch become inferred
    freed, changed = (free_batch_reshapes(proto, fixed) if fixed is not None else (proto, []))
    notes = [f"batch entry made inferred in {len(changed)} Reshape node(s)"] if changed else []
    freed_at = _StaticImport(freed, input_name, sample, path)
    verdict: List[bool] = []

    def batch_freed() -> bool:
        """A freed batch must compute what the file computes, sample for sample (ONNX Runtime);
        decided once, at a batch the file does not declare."""
        if fixed is None:
            return True
        if not verdict:
            ok = False
            if have_ort:
                b = 2 * fixed + 1
                x = random_inputs(b, sample, seed=1)
                try:
                    want = ort_run(ort_session(proto), x, chunk=fixed)
                    got = ort_run(ort_session(freed_at.proto(b)), x)
                    ok = outputs_close(got, want, rtol=1e-4)[0]
                except Exception:         # noqa: BLE001  (ONNX Runtime rejects the candidate: not freed)
                    ok = False
            verdict.append(ok)
        return verdict[0]

    # 2. folded, symbolic batch
    sym = fold(with_input_dims(freed, input_name, [BATCH_SYMBOL, *sample]), path)
    mod = attempt(lambda: to_relax(sym, path))
    if mod is not None and is_clean(mod) and batch_freed():
        return result(mod, fixed_batch=None, strategy="folded-symbolic", notes=notes)

    # 3. folded at each concrete batch (shape arithmetic that only folds once the batch is known)
    mod = attempt(lambda: freed_at(fixed or 1))
    if mod is not None and batch_freed():
        return result(mod, fixed_batch=None, at_batch=freed_at, strategy="folded-static", notes=notes)

    # 4. the batch the file pins
    if fixed is not None:
        pinned_at = _StaticImport(proto, input_name, sample, path)
        mod = attempt(lambda: pinned_at(fixed))
        if mod is not None:
            why = pinning_description(pinned_at.proto(fixed), fixed)
            if not have_ort:
                why += " (install onnxruntime to let flexiq-tvm check whether the batch can be freed)"
            return result(mod, fixed_batch=fixed, pin_reason=why, at_batch=pinned_at, strategy="pinned")

    # nothing imported: report the most informative failure (a named node if any attempt had one)
    err = next((e for e in reversed(errors) if e.node), errors[-1] if errors else
               OnnxImportError(f"{path}: TVM could not import the model"))
    ops = sorted({n.op_type for n in proto.graph.node})
    msg = f"{err}; ops in the graph: {ops}"
    if have_ort:
        try:
            outs = ort_run(ort_session(proto), random_inputs(fixed or 1, sample))
            msg += f"; ONNX Runtime runs the file (output shapes {[tuple(o.shape) for o in outs]})"
        except Exception as e:            # noqa: BLE001
            msg += f"; ONNX Runtime fails on it too ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    raise OnnxImportError(msg, op=err.op, node=err.node)
