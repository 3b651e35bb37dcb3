"""One compiled artifact serves every ratio (METHOD section 6).

`set_ratio(r)` only swaps the int32 `counts` tensor handed to `main`; the per-ratio tensors are
built once and cached, so a switch is a dictionary lookup. The plan and the build facts travel
inside the artifact (a `flexiq_manifest` function of the VM executable), so `load_artifact` needs
nothing but the `.so`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np
import tvm
from tvm import relax

from ..errors import DataError, FlexiQError
from ..quant.atomic import atomic_path
from ..quant.plan import RUNTIME_WEIGHTS_FUNC, Plan
from ..quant.schedule import check_ratio
from .quiet import tvm_serialization_logs_filtered

MANIFEST_FUNC = "flexiq_manifest"
LOWER_WEIGHTS_FUNC = RUNTIME_WEIGHTS_FUNC     # made by passes/hoist_weights.py on llvm builds
_WEIGHT_CACHE = 8                             # lowered weight sets kept (one per recent ratio)
ARTIFACT_FORMAT = "flexiq-artifact"
ARTIFACT_VERSION = 1


class CompiledModel:
    """A FlexiQ model compiled for one target and batch size; numpy in, numpy out."""

    def __init__(self, executable, manifest: dict, device=None):
        self.executable = executable
        self.manifest = manifest
        self.plan = Plan.loads(manifest["plan"], source="artifact manifest")
        self.batch_size = int(manifest["batch_size"])
        self.input_shape = tuple(manifest["input_shape"])
        self.target = manifest["target"]
        # The device (and the VM on it) is created on first use, not here: a CUDA artifact can be
        # built, ratio-set and exported on a build machine that has no GPU (cross-compiling).
        self._device = device
        self._vm = None
        self._bias_rows = None            # device tensors [0], [1], ... selecting a bias-table row
        self._cache = {}                  # ratio -> [counts, bias row index, counts tensor or None]
        self.counts = np.zeros(self.plan.num_layers, dtype=np.int32)
        self._counts_tensor = None        # None: made from `counts` at the next call
        # accuracy recovery: which row of the compiled bias tables is live (None: no tables)
        self._row_index = None
        # hoisted weight lowering (llvm): the weights lowered for a ratio are made by the VM
        # function `flexiq_lower_weights(counts)` when the ratio changes, and kept per counts
        self._lower_weights = None
        self._weights = {}                # counts bytes -> lowered weight tuple (insertion = LRU order)
        self._live_weights = None         # the tuple for the current counts (None: look it up at the next call)
        self.last_lowering_s = 0.0        # seconds the last weight lowering took (0: cached)
        self.ratio = None
        self.set_ratio(0.0)

    @property
    def device(self):
        if self._device is None:
            self._device = tvm.cpu()
        return self._device

    @property
    def vm(self):
        """The Relax VM on the artifact's device, created at the first call that needs the device."""
        if self._vm is None:
            if self.device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
                # kernels built for an AMX host use tile instructions, which Linux allows only
                # after the process asks (a no-op elsewhere)
                from ..schedules.x86_amx import request_amx_permission

                request_amx_permission()
            self._vm = relax.VirtualMachine(self.executable, self.device)
            self._main = self._vm["main"]
            if self._vm.module.implements_function(LOWER_WEIGHTS_FUNC):
                self._lower_weights = self._vm[LOWER_WEIGHTS_FUNC]
            if self.plan.bias_correction:
                n = len(self.plan.bias_correction) + 1
                self._bias_rows = [tvm.runtime.tensor(np.array([i], np.int32), self.device) for i in range(n)]
        return self._vm

    # ---- ratio control ---------------------------------------------------------------------------
    def set_ratio(self, ratio: float) -> None:
        """Fraction of MACs in 4-bit: a named plan level, or the nearest point at group granularity."""
        hit = self._cache.get(ratio)
        if hit is None:
            arrays = self.plan.runtime_arrays(check_ratio(ratio))     # the run-time contract (quant/plan.py)
            hit = self._cache[ratio] = [arrays[0], int(arrays[1][0]) if len(arrays) > 1 else None, None]
        if hit[2] is None and self._vm is not None:      # the device tensor, once per ratio
            hit[2] = tvm.runtime.tensor(hit[0], self.device)
        self.counts, self._row_index, self._counts_tensor = hit
        self.ratio = ratio
        self._live_weights = None
        self._lower_now()

    def set_counts(self, counts) -> None:
        """Per-layer numbers of 4-bit groups (any values in 0..n_groups of each layer)."""
        self.counts = self.plan.check_counts(counts)
        self._counts_tensor = None
        self._row_index = 0 if self.plan.bias_correction else None    # no correction off-level
        self.ratio = self.plan.mac_ratio(self.counts)
        self._live_weights = None
        self._lower_now()

    def _lower_now(self) -> None:
        """A hoisted-weights artifact lowers its weights for a new ratio here, inside the switch
        (`last_lowering_s` says what it cost; a ratio used recently costs a lookup), not at the
        next inference. Before the VM exists (cross-compiling) nothing runs."""
        if self._vm is not None and self._lower_weights is not None:
            self.runtime_args()

    @property
    def mac_ratio(self) -> float:
        return self.plan.mac_ratio(self.counts)

    # ---- running ---------------------------------------------------------------------------------
    def _check(self, x) -> np.ndarray:
        arr = np.asarray(x)
        if arr.ndim == len(self.input_shape):
            arr = arr[None]
        if arr.shape[1:] != self.input_shape:
            raise DataError(f"input shape {np.shape(x)} does not match the artifact's input (N, "
                            f"{', '.join(map(str, self.input_shape))})")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def runtime_args(self) -> list:
        """The run-time arguments of `main` after the input: counts, the bias-table row (plans with
        bias corrections) and the lowered weights (llvm artifacts)."""
        self.vm                           # the device exists from here on
        if self._counts_tensor is None:
            self._counts_tensor = tvm.runtime.tensor(self.counts, self.device)
        args = [self._counts_tensor]
        if self._row_index is not None:
            args.append(self._bias_rows[self._row_index])
        if self._lower_weights is not None:
            if self._live_weights is None:        # once per ratio change, not per inference
                self._live_weights = self._lowered_weights()
            args.append(self._live_weights)
        return args

    def _lowered_weights(self):
        """The weights lowered for the current counts: made once per ratio change, then reused."""
        key = self.counts.tobytes()
        w = self._weights.pop(key, None)
        if w is None:
            t0 = time.perf_counter()
            w = self._lower_weights(self._counts_tensor)
            self.last_lowering_s = time.perf_counter() - t0
            while len(self._weights) >= _WEIGHT_CACHE:
                self._weights.pop(next(iter(self._weights)))
        else:
            self.last_lowering_s = 0.0
        self._weights[key] = w
        return w

    def run_batch(self, x: np.ndarray):
        """One call of the compiled function on exactly `batch_size` samples (tvm tensors out)."""
        args = self.runtime_args()
        return self._main(tvm.runtime.tensor(x, self.device), *args)

    def __call__(self, x) -> np.ndarray:
        arr = self._check(x)
        n, B = arr.shape[0], self.batch_size
        outs = []
        for s in range(0, n, B):
            chunk = arr[s:s + B]
            if chunk.shape[0] < B:
                pad = np.zeros((B - chunk.shape[0],) + chunk.shape[1:], np.float32)
                chunk = np.concatenate([chunk, pad])
            outs.append(self.run_batch(chunk).numpy()[: min(B, n - s)])
        return np.concatenate(outs)

    def time_batch(self, number: int = 10, repeat: int = 5, x: Optional[np.ndarray] = None) -> float:
        """Median seconds of one call on a full batch at the current ratio."""
        if x is None:
            x = np.random.default_rng(0).standard_normal((self.batch_size,) + self.input_shape).astype(np.float32)
        t = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)(
            tvm.runtime.tensor(self._check(x), self.device), *self.runtime_args())
        return float(np.median(t.results))

    def npu_stats(self) -> dict:
        """Per-layer NPU cycles (compute, DMA, vector, total), MACs and array utilisation of the last
        call; artifacts built for target "npu" only (the table lives in the simulator runtime)."""
        from ..targets.npu.stats import read_stats

        return read_stats(self)

    # ---- files ---------------------------------------------------------------------------------
    def export(self, path) -> None:
        """Writes one shared library holding code, INT8 weights, shift tables and the plan."""
        path = os.fspath(path)
        if not path.endswith(".so"):
            raise FlexiQError(f"{path}: artifacts are shared libraries; use a .so file name")
        with atomic_path(path) as tmp:
            tmp_so = tmp + ".so"
            try:
                with tvm_serialization_logs_filtered():
                    self.executable.export_library(tmp_so)
                os.replace(tmp_so, tmp)
            finally:
                if os.path.exists(tmp_so):
                    os.unlink(tmp_so)

    def __repr__(self):
        return (f"CompiledModel({self.manifest.get('model_name')!r}, target={self.target!r}, "
                f"batch_size={self.batch_size}, layers={self.plan.num_layers}, ratio={self.ratio})")


def load_artifact(path, device=None) -> CompiledModel:
    """Loads an exported artifact (plan included) in any process."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FlexiQError(f"{path}: no such artifact")
    try:
        with tvm_serialization_logs_filtered():
            lib = tvm.runtime.load_module(path)
    except Exception as e:
        first = str(e).splitlines()[0][:200]
        if "loader of that name is not registered" in first:
            kind = first.split("{", 1)[-1].split("}", 1)[0] if "{" in first else "a device"
            raise FlexiQError(f"{path}: the artifact holds {kind} code and this TVM runtime has no {kind} support; "
                              f"load it where TVM was built with {kind} (building and exporting need no "
                              f"device, running does)") from None
        raise FlexiQError(f"{path}: not a loadable TVM artifact ({first})") from None
    try:
        vm = relax.VirtualMachine(lib, tvm.cpu())
        manifest = json.loads(str(vm[MANIFEST_FUNC]()))
    except Exception:
        raise FlexiQError(f"{path}: not a flexiq-tvm artifact (no manifest)") from None
    if manifest.get("format") != ARTIFACT_FORMAT or int(manifest.get("version", 0)) > ARTIFACT_VERSION:
        raise FlexiQError(f"{path}: artifact format {manifest.get('format')!r} v{manifest.get('version')} "
                          f"is not readable by this flexiq-tvm (reads {ARTIFACT_FORMAT} <= v{ARTIFACT_VERSION})")
    return CompiledModel(lib, manifest, device)
