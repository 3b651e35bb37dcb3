"""The CUDA target (issue 6): mixed INT8/INT4 layers on tensor cores, one artifact for every ratio.

``fq.compile(model, plan, target="cuda", arch="sm_80" | "sm_86" | "sm_89" | "sm_90")``.

Each FlexiQ layer function of the rewritten module is re-lowered here (nothing in ``passes/`` or
``quant/`` changes), see ``schedules/cuda.py`` for the kernels:

* **tensor-core layers** (conv2d with ``groups == 1`` and dense, at least 16 input channels):
  ``quantize_tc`` (quantize + gather into lowering order, NHWC, zero padding) then ``gemm_tc``
  (implicit GEMM; per 64-channel K-slice group ``g < counts[layer]`` -> INT4 ``mma.m16n8k64`` on
  nibbles derived from the stored INT8 by the strict-subset shift, per-group shift-and-accumulate
  on CUDA cores; otherwise INT8 ``mma.m16n8k32``; fused dequantize + bias).  The weights are
  stored once, INT8, permuted into lowering order at compile time.  On **sm_90** the INT4 mma is
  emulated by ptxas, so the 4-bit groups use the INT8 tensor cores (same shifts, exact): **the
  ratio gains no speed on Hopper**, it only changes accuracy.
* **CUDA-core layers** (depthwise and other grouped convs, layers with < 16 input channels, or
  layers the re-lowering does not understand, e.g. run-time bias tables): the target-neutral
  kernels of ``compute.py`` (quantize with lowering, weight lowering, INT8 conv on the
  strict-subset values), made float-exact for CUDA and scheduled by dlight.

The per-layer counts stay a run-time int32 tensor read by the kernels: ``set_ratio`` changes no
code and no constant.

Options: ``arch`` (default ``sm_80``), ``tensor_cores`` (False: every layer on the CUDA-core
path), ``allow_padded_groups`` (accept a plan whose ``group_size`` is not a multiple of 64: each
group is zero-padded to 64 channels, exact but slower), ``kernel`` (``"staged"``, the default: the
cp.async / ldmatrix pipelined GEMM of issue 17; ``"direct"``: the first kernel, fragments straight
from global memory), ``tiles`` (``{layer index: schedules.cuda.Tile}`` overriding the per-layer
heuristic ``schedules.cuda.choose_tile``, the hook for tuned tiles), ``stages`` (pipeline depth of
the staged kernel, default 3), ``nt`` / ``wm`` (tile of the direct kernel: 8*nt output channels x
16*wm pixels per thread block).  ``report["tiles"]`` lists the tile chosen per layer.

**Group sizes.** A 4-bit group must fill whole INT4 K-tiles (64 channels) for the per-group shift
to be exact without padding: plans for this target should be made with
``fq.quantize(..., group_size=64)`` (or 128, ...).  The last group of a layer and layers with
fewer channels than one group are zero-padded (exact).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional

import numpy as np
import tvm
from tvm import relax

from ..errors import FlexiQError
from ..schedules import cuda as cuda_sched
from ..schedules.compute import KERNEL_ATTR
from . import register_target
from .base import FlexiQTarget

SUPPORTED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
TC_MIN_CHANNELS = 16


def cuda_target(arch: str = "sm_80") -> tvm.target.Target:
    if arch not in SUPPORTED_ARCHS:
        raise FlexiQError(f"cuda target: arch={arch!r} is not supported; use one of {', '.join(SUPPORTED_ARCHS)} "
                          "(INT8 mma.m16n8k32 needs sm_80 or newer)")
    return tvm.target.Target({"kind": "cuda", "arch": arch})


# --------------------------------------------------------------------------- toolchain helpers
def find_nvcc() -> Optional[str]:
    p = shutil.which("nvcc")
    if p:
        return p
    for c in ("/usr/local/cuda/bin/nvcc",):
        if os.path.exists(c):
            return c
    return None


def _tool_dirs() -> List[str]:
    dirs = []
    nv = find_nvcc()
    if nv:
        dirs.append(os.path.dirname(os.path.realpath(nv)))
    try:  # pip wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm
        import nvidia  # noqa: F401

        for base in list(nvidia.__path__):
            dirs += sorted(glob.glob(os.path.join(base, "*", "bin")))
    except Exception:  # noqa: BLE001
        pass
    return dirs


def find_cuobjdump() -> Optional[str]:
    """cuobjdump with an nvdisasm beside it or on PATH (both are needed for -sass)."""
    path = None
    for d in _tool_dirs():
        if os.path.exists(os.path.join(d, "cuobjdump")):
            path = os.path.join(d, "cuobjdump")
            break
    path = path or shutil.which("cuobjdump")
    if path is None:
        return None
    if not (shutil.which("nvdisasm") or any(os.path.exists(os.path.join(d, "nvdisasm")) for d in _tool_dirs())):
        return None
    return path


def nvcc_cubin(source: str, arch: str) -> bytes:
    """Compile CUDA source with nvcc to a cubin for `arch` (the way TVM does at load time)."""
    from tvm.support import nvcc

    with cuda_target(arch):
        return bytes(nvcc.compile_cuda(source, target_format="cubin", arch=["-arch", arch], compiler="nvcc"))


def sass(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin."""
    exe = find_cuobjdump()
    if exe is None:
        raise FlexiQError("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(_tool_dirs() + [env.get("PATH", "")])
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(cubin)
        r = subprocess.run([exe, "-sass", p], capture_output=True, text=True, env=env)
    if r.returncode:
        raise FlexiQError(f"cuobjdump failed: {r.stderr.strip()[:400]}")
    return r.stdout


def cuda_module_source(executable) -> str:
    """The CUDA C source inside a built Relax executable (VMExecutable > host > cuda)."""
    def walk(m):
        if m.kind == "cuda":
            return m.inspect_source()
        for sub in m.imports:
            s = walk(sub)
            if s is not None:
                return s
        return None
    mod = executable.mod if hasattr(executable, "mod") else executable
    src = walk(mod)
    if src is None:
        raise FlexiQError("no CUDA module in this executable")
    return src


# --------------------------------------------------------------------------- layer re-lowering
def _group_sizes(rank: np.ndarray) -> List[int]:
    return [int(v) for v in np.bincount(rank, minlength=int(rank.max()) + 1)]


def check_group_sizes(rank: np.ndarray, layer: int = 0, allow_padded_groups: bool = False) -> None:
    """Every group but a layer's last must fill whole INT4 K-tiles (64 channels)."""
    bad = [s for s in _group_sizes(np.asarray(rank))[:-1] if s % cuda_sched.K4]
    if bad and not allow_padded_groups:
        raise FlexiQError(
            f"cuda target: layer {layer} has 4-bit groups of {bad[0]} channels; the tensor-core kernels "
            f"need group_size to be a multiple of {cuda_sched.K4} (re-quantize with "
            f"fq.quantize(..., group_size={cuda_sched.K4}) or compile with allow_padded_groups=True, "
            "which zero-pads every group to 64 channels: exact but slower)")


@register_target("cuda")
class CUDATarget(FlexiQTarget):
    name = "cuda"
    # per-ratio bias rows would need a run-time row index in the epilogue: not built yet
    supports_bias_rows = False

    def __init__(self, tvm_target=None, schedule: bool = True, arch: str = "sm_80", tensor_cores: bool = True,
                 allow_padded_groups: bool = False, nt: int = 4, wm: int = 4, kernel: str = "staged",
                 tiles: Optional[Dict[int, "cuda_sched.Tile"]] = None, stages: int = 3):
        super().__init__(tvm_target or cuda_target(arch))
        self.arch = str(self.tvm_target.attrs.get("arch", arch)) if tvm_target is not None else arch
        self.schedule = schedule
        self.tensor_cores = bool(tensor_cores)
        self.allow_padded_groups = bool(allow_padded_groups)
        self.nt, self.wm = int(nt), int(wm)
        if kernel not in ("staged", "direct"):
            raise FlexiQError(f"cuda target: kernel={kernel!r}; use 'staged' (default) or 'direct'")
        self.kernel = kernel
        self.tiles = dict(tiles or {})
        self.stages = int(stages)
        self.int4_mma = cuda_sched.int4_native(self.arch)
        self.report: Dict[str, list] = {"tensor_core_layers": [], "cuda_core_layers": [], "tiles": []}

    # ---- kernels kept from compute.py (CUDA-core path) ----------------------------------------
    def schedule_kernel(self, func):
        kind = str(func.attrs[KERNEL_ATTR])
        if kind in ("quantize_tc", "gemm_tc"):
            return func
        # dlight (ApplyDefaultSchedule in the CUDA pipeline) binds the threads; only the float
        # ops need rewriting so that CUDA rounds like numpy
        return cuda_sched.cuda_safe_float(func)

    # ---- the tensor-core lowering -------------------------------------------------------------
    def _tc_function(self, bb: relax.BlockBuilder, func: relax.Function, prims, index: int):
        """A new layer function on the tensor-core kernels, or None (keep the CUDA-core path)."""
        from .npu.codegen import extract_layer

        if len(func.params) != 2:
            return None, "run-time tables or bias rows"
        try:
            L = extract_layer(func, {}, prims)[0]   # (layer, x, counts[, bias row]): only the layer
        except Exception as e:  # noqa: BLE001
            return None, f"not re-lowerable ({str(e).splitlines()[0][:80]})"
        if getattr(L, "relu", False):   # the GEMM epilogue has no activation: keep such a layer as it is
            return None, "activation inside the layer function"
        if L.groups != 1:
            return None, "grouped / depthwise conv"
        if L.C < TC_MIN_CHANNELS:
            return None, f"{L.C} input channels"
        check_group_sizes(L.rank, L.layer, self.allow_padded_groups)
        lay = cuda_sched.tc_layout(L.rank)
        ex = np.zeros(lay.n_groups, np.int32)
        for g in range(lay.n_groups):
            ex[g] = L.act_shift_c[np.nonzero(L.rank == g)[0][0]]
        act_scale = L.act_scale   # printed exactly by TVMScript (float32 as a round-tripping double)
        w = cuda_sched.prepare_weight(L.weight, lay)
        adt = "uint8" if L.unsigned else "int8"
        x_ty, counts_ty = func.params[0].ty, func.params[1].ty
        num_layers = int(counts_ty.shape.values[0])
        out_shape = [int(v) for v in func.ret_ty.shape.values]
        if L.op == "conv2d":
            shp = L.geometry           # one geometry record (quant/layer.py ConvGeometry = GemmShape)
            qf = cuda_sched.quantize_tc((L.N, L.C, L.H, L.W), lay, act_scale, L.unsigned,
                                        pad=(L.PT, L.PL, L.PB, L.PR))
            y_shape = [L.N, L.O, L.OH, L.OW]
        else:
            shp = L.geometry
            qf = cuda_sched.quantize_tc((L.N, L.C), lay, act_scale, L.unsigned)
            y_shape = [L.N, L.O]
        tile = None
        if self.kernel == "staged":
            tile = self.tiles.get(int(L.layer)) or cuda_sched.choose_tile(
                shp.M, shp.O, sms=cuda_sched.SM_COUNT.get(self.arch, 132), stages=self.stages)
            self.report["tiles"].append((index, L.layer, shp.M, shp.O, int(lay.Kc * shp.KH * shp.KW), tile))
        gf = cuda_sched.gemm_tc(shp, lay, L.layer, num_layers, L.unsigned, int4_mma=self.int4_mma, mode="cuda",
                                nt=self.nt, wm=self.wm, kernel=self.kernel, tile=tile)
        qf = cuda_sched.schedule_elementwise(qf, "xq")
        x = relax.Var("x", x_ty)
        counts = relax.Var("counts", counts_ty)
        tmp = f"flexiq_cuda_layer_{index}"
        with bb.function(tmp, [x, counts], private=True):
            with bb.dataflow():
                xin = x
                if L.op == "dense" and len(x_ty.shape.values) != 2:
                    xin = bb.emit(relax.op.reshape(x, (L.N, L.C)))
                gq = bb.add_func(qf.with_attr(KERNEL_ATTR, "quantize_tc"), f"flexiq_cuda_quantize_{index}")
                gg = bb.add_func(gf, f"flexiq_cuda_gemm_{index}")
                xq = bb.emit(relax.call_tir(gq, [xin, relax.const(lay.src)],
                                            relax.TensorType([shp.N, shp.Hp, shp.Wp, lay.Kc], adt)))
                y = bb.emit(relax.call_tir(
                    gg, [xq, relax.const(w), counts, relax.const(ex), relax.const(np.ascontiguousarray(
                        L.weight_shift, np.int32)), relax.const(L.scale.astype(np.float32)),
                         relax.const(L.bias.astype(np.float32))],
                    relax.TensorType(y_shape, "float32")))
                if y_shape != out_shape:
                    y = bb.emit(relax.op.reshape(y, out_shape))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        return tmp, None

    def lower(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Replace the FlexiQ layer functions that suit the tensor cores (see the module doc)."""
        from ..passes.flexiq_rewrite import LAYER_FUNC_PREFIX

        self.report = {"tensor_core_layers": [], "cuda_core_layers": [], "tiles": []}
        prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
        layers = sorted(((gv, f) for gv, f in mod.functions_items()
                         if isinstance(f, relax.Function) and gv.name_hint.startswith(LAYER_FUNC_PREFIX)),
                        key=lambda t: int(t[0].name_hint[len(LAYER_FUNC_PREFIX):]))
        bb = relax.BlockBuilder(mod)
        replaced = []
        for gv, f in layers:
            idx = int(gv.name_hint[len(LAYER_FUNC_PREFIX):])
            name = str(f.attrs["flexiq.name"]) if f.attrs is not None and "flexiq.name" in f.attrs else gv.name_hint
            tmp, why = (None, "tensor_cores=False") if not self.tensor_cores else self._tc_function(bb, f, prims, idx)
            if tmp is None:
                self.report["cuda_core_layers"].append((idx, name, why))
            else:
                self.report["tensor_core_layers"].append((idx, name))
                replaced.append((gv, f, tmp))
        new = bb.get()
        for gv, f, tmp in replaced:
            nf = new[new.get_global_var(tmp)]
            new[gv] = relax.Function(nf.params, nf.body, nf.ret_ty, nf.is_pure, f.attrs)
        entries = [gv.name_hint for gv, f in new.functions_items()
                   if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs]
        return relax.transform.DeadCodeElimination(entries)(new)

    def build(self, mod: tvm.IRModule, tuning_db=None):
        return super().build(self.lower(mod), tuning_db)

    def build_executable(self, model, plan, batch_size: int = 1):
        """Rewrite + lower + build without creating a VM (works on a machine with no GPU)."""
        from ..runtime.build import _as_model, _as_plan
        from ..passes.flexiq_rewrite import flexiq_rewrite

        plan = _as_plan(plan)
        model = _as_model(model, plan)
        batch_size = model.check_batch(batch_size)
        return self.build(flexiq_rewrite(*model.at(batch_size), plan, batch_size))

    def device(self):
        return tvm.cuda(0)

