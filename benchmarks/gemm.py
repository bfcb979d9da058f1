"""GEMM rates per arithmetic as OpenVINO's CPU plugin runs them: the floor of each variant.

A variant's floor is its FLOPs at the rate of its own arithmetic: FP32 (and the FP16 IR, which
computes in FP32 on CPUs) at the FP32 GEMM rate, BF16 variants at the BF16 rate (AMX or
AVX512-BF16 where present), INT8 at the INT8 rate (VNNI/AMX). One MatMul of size² × size²,
compiled with the runtime's settings; INT8 is the same MatMul behind FakeQuantize on both inputs,
the form NNCF writes (the input is fed non-negative, as its u8 quantizer expects). Each probe reports the precision the plugin actually ran (its execution
graph), so a bf16 hint compiled as f32 on a CPU without BF16 shows as such.

    python benchmarks/gemm.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from samedge.runtime.cpu import cpu_name, isa_summary  # noqa: E402

ARITHMETIC = ("f32", "bf16", "int8")


def _fake_quantize(node, low: float, high: float, levels: int):
    from openvino import opset13 as ops

    lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
    return ops.fake_quantize(node, lo, hi, lo, hi, levels)


def gemm_probe(arithmetic: str, size: int = 2048, threads: int | None = None):
    """(run, flops, precision ran): ``run()`` times one GEMM call in seconds."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([size, size], np.float32, name="x")
    weight = ops.constant(rng.standard_normal((size, size)).astype(np.float32))
    if arithmetic == "int8":
        # NNCF's form: asymmetric u8 activations, symmetric weights (255 levels, zero point 0);
        # a weight quantizer with 256 levels over [-4, 4] has no integer zero point, and the
        # plugin then keeps the layer f32 (checked: its execution graph says f32)
        product = ops.matmul(_fake_quantize(x, 0.0, 8.0, 256),
                             _fake_quantize(weight, -4.0, 4.0, 255), False, False)
    else:
        product = ops.matmul(x, weight, False, False)
    model = ov.Model([product], [x])
    config = {"PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "bf16" if arithmetic == "bf16" else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(model, "CPU", config)
    ran = sorted({str(op.get_rt_info()["runtimePrecision"].astype(str))
                  for op in compiled.get_runtime_model().get_ordered_ops()
                  if str(op.get_rt_info()["layerType"].astype(str)) in
                  ("FullyConnected", "MatMul", "Convolution")})
    request = compiled.create_infer_request()
    feed = np.abs(rng.standard_normal((size, size))).astype(np.float32)
    request.infer({0: feed})

    def run() -> float:
        start = time.perf_counter()
        request.infer({0: feed})
        return time.perf_counter() - start

    return run, 2.0 * size**3, "/".join(ran) or "?"


def arithmetic_of(precision: str) -> str:
    """The GEMM arithmetic a variant's heavy layers run in (its floor): BF16 variants bf16,
    INT8 variants int8 (their float units then run faster than this floor assumes), else f32."""
    if "bf16" in precision and "int8" not in precision:
        return "bf16"
    return "int8" if "int8" in precision else "f32"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"cpu: {cpu_name()} ({isa_summary()}), threads {args.threads}")
    probes = {a: gemm_probe(a, args.size, args.threads) for a in ARITHMETIC}
    samples = {a: [] for a in ARITHMETIC}
    for _ in range(args.repeats):  # interleaved: every arithmetic sees the same load
        for arithmetic, (run, _, _) in probes.items():
            samples[arithmetic].append(run())
    print(f"{'arithmetic':<10} {'ran as':>8} {'GFLOP/s median':>15} {'best':>8}")
    for arithmetic, (_, flops, ran) in probes.items():
        times = samples[arithmetic]
        print(f"{arithmetic:<10} {ran:>8} {flops / statistics.median(times) / 1e9:15.1f} "
              f"{flops / min(times) / 1e9:8.1f}")


if __name__ == "__main__":
    main()
