"""SAM ViT-B image encoder (1024²) on OpenVINO's CPU plugin under each inference-precision hint:
f32, bf16 and f16, timed in interleaved rounds against f32 and the floor of each arithmetic.

Random weights (seeded; no ViT-B checkpoint is available here): fine for speed, which does not
depend on the values, and the embedding cosine to f32 then only says the hint changed the
arithmetic, not how masks would drift. Each hint's row says what the plugin actually ran (its
execution graph's precision for MatMul/FullyConnected/Convolution): on a CPU without BF16 or FP16
arithmetic the hints compile as f32, and the row says so. Prints a table; never run as a test.

    python benchmarks/vit_b_precision.py --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gemm import gemm_probe  # noqa: E402
from samedge.runtime.cpu import cpu_name, isa_summary  # noqa: E402
from samedge.speed.timing import interleaved  # noqa: E402

HINTS = ("f32", "bf16", "f16")
VIT_B_GFLOP = 972.0  # per 1024² image (design.md)


def export_encoder(folder: Path) -> Path:
    """The ViT-B encoder as ONNX, random weights, through samedge's own export."""
    import torch

    from samedge.export.graphs import encoder_spec
    from samedge.export.onnx import export_graph
    from samedge.models import build_model

    torch.manual_seed(0)
    card = build_model("sam", variant="vit_b")
    spec = encoder_spec(card)
    example = torch.zeros(spec.inputs["image"], dtype=torch.float32)
    with torch.no_grad():
        return export_graph(card.model.eval().image_encoder, spec, (example,),
                            folder / "encoder.onnx")


def compiled_hint(model, hint: str, threads: int):
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint,
              "INFERENCE_NUM_THREADS": threads}
    compiled = ov.Core().compile_model(model, "CPU", config)
    ran = sorted({str(op.get_rt_info()["runtimePrecision"].astype(str))
                  for op in compiled.get_runtime_model().get_ordered_ops()
                  if str(op.get_rt_info()["layerType"].astype(str)) in
                  ("FullyConnected", "MatMul", "Convolution")})
    return compiled.create_infer_request(), "/".join(ran) or "?"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import openvino as ov

    print(f"cpu: {cpu_name()} ({isa_summary()}), threads {args.threads}; OpenVINO "
          f"{ov.__version__}; SAM ViT-B encoder, random weights, 1024² input")
    with tempfile.TemporaryDirectory(prefix="samedge-vitb-") as tmp:
        model = ov.Core().read_model(str(export_encoder(Path(tmp))))
        requests = {hint: compiled_hint(model, hint, args.threads) for hint in HINTS}
        image = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
        outputs = {hint: np.array(request.infer({0: image})[0], copy=True)
                   for hint, (request, _) in requests.items()}
        calls = [[lambda request=request: request.infer({0: image})]
                 for request, _ in requests.values()]
        samples = interleaved(calls, args.rounds, warmup=1, settle_s=0.05)
    rates = {}
    for arithmetic in ("f32", "bf16"):
        run, flops, ran = gemm_probe(arithmetic, threads=args.threads)
        rates[arithmetic] = (flops / min(run() for _ in range(5)) / 1e9, ran)
    want = outputs["f32"].ravel().astype(np.float64)
    base = statistics.median(samples[0][0])
    print(f"GEMM best: f32 {rates['f32'][0]:.0f} GFLOP/s, bf16 hint {rates['bf16'][0]:.0f} "
          f"GFLOP/s (ran as {rates['bf16'][1]})")
    print(f"{'hint':<6} {'ran as':>8} {'median s':>9} {'best s':>7} {'vs f32':>7} "
          f"{'x floor':>8} {'cosine vs f32':>14}")
    for (hint, (_, ran)), times in zip(requests.items(), samples):
        median = statistics.median(times[0])
        got = outputs[hint].ravel().astype(np.float64)
        cosine = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
        floor = VIT_B_GFLOP / rates["bf16" if ran == "bf16" else "f32"][0]
        print(f"{hint:<6} {ran:>8} {median:9.2f} {min(times[0]):7.2f} {base / median:6.2f}x "
              f"{median / floor:8.2f} {cosine:14.6f}")


if __name__ == "__main__":
    main()
