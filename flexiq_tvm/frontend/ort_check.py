"""Checks once per model file that TVM's import computes what ONNX Runtime computes.

An importer that silently changes a model's function (a folded shape that is wrong at another batch,
an op converted with the wrong attribute) would make every FlexiQ number afterwards meaningless, so
`load_model` runs the prepared FP32 module (what FlexiQ quantizes: BatchNorm folded, shapes folded,
batch bound) and ONNX Runtime on the original file with the same random inputs, and refuses a model
whose outputs differ. The result is cached on disk by the file's content hash, the input shape and
the versions involved: a model is checked once, not at every command.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import tvm

from ..errors import ModelError
from ..quant.atomic import atomic_path
from .onnx_import import ImportedOnnx, ort_available, ort_run, ort_session, outputs_close, random_inputs

CHECK_SAMPLES = 2
CHECK_RTOL = 1e-3


def cache_dir() -> str:
    """`$FLEXIQ_TVM_CACHE` or ~/.cache/flexiq_tvm (tests point it at a temporary folder)."""
    return os.environ.get("FLEXIQ_TVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flexiq_tvm")


def _key(imported: ImportedOnnx) -> str:
    import onnxruntime

    from .._version import __version__

    h = hashlib.sha256(imported.proto.SerializeToString())
    h.update(json.dumps([list(imported.sample_shape), imported.strategy, __version__, tvm.__version__,
                         onnxruntime.__version__]).encode())
    return h.hexdigest()[:32]


def _outputs(result) -> list:
    """The VM's result (a tensor or a nest of tuples of tensors) as a flat list of arrays."""
    if hasattr(result, "numpy"):
        return [result.numpy()]
    out = []
    for r in result:
        out.extend(_outputs(r))
    return out


def check_against_ort(imported: ImportedOnnx, mod_at, source: str) -> Optional[dict]:
    """{'max_abs_diff', 'outputs', 'batch', 'cached'} or None without ONNX Runtime; raises ModelError
    naming the first output that differs."""
    if not ort_available():
        return None
    from ..calibrate.stats import build_float

    path = os.path.join(cache_dir(), "import_checks", _key(imported) + ".json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                hit = json.load(f)
            return dict(hit, cached=True)
        except (OSError, ValueError):
            pass
    batch = imported.fixed_batch or CHECK_SAMPLES
    x = random_inputs(batch, imported.sample_shape, seed=0)
    want = ort_run(ort_session(imported.proto), x, chunk=imported.declared_batch)
    vm = build_float(mod_at(batch))
    got = _outputs(vm["main"](tvm.runtime.tensor(x)))
    names = [o.name for o in imported.proto.graph.output]
    ok, first, diff = outputs_close(got, want, rtol=CHECK_RTOL)
    if not ok:
        which = names[first] if 0 <= first < len(names) else f"#{first}"
        shapes = f"TVM {[g.shape for g in got]} vs ONNX Runtime {[w.shape for w in want]}"
        raise ModelError(f"{source}: TVM's import changes the model's function: output {which!r} differs from "
                         f"ONNX Runtime FP32 by max |diff| {diff:.3g} on random inputs ({shapes}); "
                         f"import path: {imported.strategy}")
    report = {"max_abs_diff": diff, "outputs": names, "batch": batch, "strategy": imported.strategy}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(report, f)
    return dict(report, cached=False)
