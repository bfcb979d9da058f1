#!/usr/bin/env bash
# samedge's TensorRT path on this machine's NVIDIA GPU, in one command, from the repository root
# with samedge and TensorRT installed (pip install -e ".[test]"; TensorRT's Python package from
# NVIDIA, or JetPack's on a Jetson):
#
#   bash benchmarks/gpu_check.sh [BUNDLE]   # default ./gpu-check-bundle, exported if absent;
#                                           # PYTHON=... picks the interpreter (default python3)
#
# 1. samedge doctor: the Quickstart (LiteMedSAM) bundle against the installed TensorRT's parser
# 2. FP16, INT8 and (compute capability 8.0+) BF16 engines (samedge build --backend tensorrt):
#    each engine measured and gated itself
# 3. samedge validate --backend tensorrt: every engine pair re-measured on this GPU
# 4. latency of the engines vs PyTorch eager on the same GPU (benchmarks/tensorrt_latency.py)
# 5. the gpu-marked tests (builder, runtime, validate)
#
# Exit 0 when every step passed, 1 when only accuracy gates kept something out, 2 on an error.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-gpu-check-bundle}
source benchmarks/check_steps.sh  # PY, samedge, step, record, status

step "TensorRT and the GPU"
"$PY" -c "import tensorrt; print('TensorRT', tensorrt.__version__)" || exit 2
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null \
  || echo "(no nvidia-smi: a Jetson? samedge asks the CUDA driver)"

if [ ! -f "$BUNDLE/manifest.json" ]; then
  step "export the Quickstart bundle"
  samedge export -o "$BUNDLE" || exit 2
fi

step "samedge doctor"
samedge doctor "$BUNDLE"; record $(( $? ? 2 : 0 ))

precisions="fp16 int8"
capability=$("$PY" -c "from samedge.runtime.backends.trt_compat import gpu_compute_capability as c; print(c() or '')")
if [ "${capability%%.*}" -ge 8 ] 2>/dev/null; then precisions="$precisions bf16"
else echo "(compute capability ${capability:-unknown}: no BF16 tensor cores, BF16 skipped)"; fi
for precision in $precisions; do
  step "samedge build --backend tensorrt --precision $precision"
  samedge build "$BUNDLE" --backend tensorrt --precision "$precision" --no-layer-errors
  record $?
done

step "samedge validate --backend tensorrt"
samedge validate "$BUNDLE" --backend tensorrt --report "$BUNDLE-validation-tensorrt"; record $?

step "latency: TensorRT engines vs PyTorch eager on this GPU"
"$PY" benchmarks/tensorrt_latency.py --bundle "$BUNDLE"; record $(( $? ? 2 : 0 ))

step "pytest -m gpu"
"$PY" -m pytest -m gpu -q -rs; record $(( $? ? 2 : 0 ))

echo
echo "gpu_check: exit $status"
exit $status
