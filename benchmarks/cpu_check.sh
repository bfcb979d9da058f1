#!/usr/bin/env bash
# samedge's CPU precision path on this machine, in one command, from the repository root with
# samedge installed (pip install -e ".[test]"): what a session on a new processor (an AMX Xeon,
# a Zen 4 EPYC, an AVX2 laptop) runs to get every figure README's Precision section quotes.
#
#   bash benchmarks/cpu_check.sh [BUNDLE]   # default ./cpu-check-bundle (replaced each run);
#                                           # PYTHON=... picks the interpreter (default python3)
#
# 1. the CPU's name, the ISA flags samedge decides by, and OpenVINO's own capability list
# 2. samedge pipeline: the Quickstart bundle, FP16/INT8 (and, where the CPU computes BF16, BF16
#    and INT8+BF16) searched and gated, the default chosen by interleaved timing, and the
#    held-out check on slices no step read (what `samedge validate BUNDLE` measures)
# 3. sustained GEMM rates per arithmetic (benchmarks/gemm.py)
# 4. every variant of the bundle against PyTorch eager and the floor of its arithmetic
#    (benchmarks/latency.py)
# 5. SAM ViT-B's encoder under OpenVINO's f32/bf16/f16 hints (benchmarks/vit_b_precision.py;
#    random weights: speed only)
#
# Exit 0 when every step passed, 1 when only accuracy gates failed, 2 on an error.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-cpu-check-bundle}
source benchmarks/check_steps.sh  # PY, samedge, step, record, status

step "the CPU"
"$PY" - <<'EOF' || exit 2
from samedge.quantize.bf16 import openvino_capabilities
from samedge.runtime.cpu import cpu_facts

for key, value in cpu_facts().items():
    print(f"{key}: {value}")
print("OpenVINO CPU capabilities:", ", ".join(openvino_capabilities()))
EOF

step "samedge pipeline -o $BUNDLE"
samedge pipeline -o "$BUNDLE"; record $?  # replaces an earlier samedge bundle, nothing else
[ -f "$BUNDLE/manifest.json" ] || exit 2

step "GEMM rates"
"$PY" benchmarks/gemm.py; record $(( $? ? 2 : 0 ))

step "latency of every variant"
"$PY" benchmarks/latency.py --bundle "$BUNDLE" --no-memory; record $(( $? ? 2 : 0 ))

step "SAM ViT-B encoder under OpenVINO's precision hints"
"$PY" benchmarks/vit_b_precision.py; record $(( $? ? 2 : 0 ))

echo
echo "cpu_check: exit $status"
exit $status
