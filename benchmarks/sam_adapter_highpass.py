"""What SAM-Adapter's FFT high-pass costs once it is matrix products, beside the encoder.

Prints tables; never run as a test. FLOPs (torch's flop counter, 2 per multiply-add) of the
encoder at 1024² for ViT-B/L/H — the upstream encoder on the meta device (torch.fft is not
counted) plus ``HighPass.flops()`` — and, for ``--time`` variants, the measured share of the
exported encoder's time: the OpenVINO encoder profiled node by node (``PERF_COUNT``: the
``/highpass/`` nodes against all nodes), and the high-pass graph alone against the whole encoder
in ONNX Runtime and OpenVINO (interleaved rounds). Weights are random in upstream's layout (the
cost does not depend on their values; rel-pos tables are filled so no attention term is dropped).

    python benchmarks/sam_adapter_highpass.py                 # FLOPs for B/L/H, times for ViT-B
    python benchmarks/sam_adapter_highpass.py --time vit_b vit_l --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from workload import count_flops, loadavg  # noqa: E402

from samedge.runtime.cpu import cpu_name, isa_summary  # noqa: E402
from samedge.speed.timing import interleaved  # noqa: E402

SIZE = 1024
VARIANTS = ("vit_b", "vit_l", "vit_h")


def reference(variant: str, device: str = "cpu"):
    """Upstream's SAM-Adapter at 1024² (cod-sam-vit-*.yaml), random weights."""
    import torch

    from samedge.models.infer import DecoderShape
    from samedge.models.sam import SAM_VARIANTS
    from samedge.models.sam_adapter import sam_adapter_reference

    config = SAM_VARIANTS[variant]
    shape = DecoderShape(256, 4, 2, 2048, 256, 3, 2, 32, "sam")
    with torch.device(device):
        model = sam_adapter_reference(config, shape, config.embed_dim // 32).eval()
    if device != "meta":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "rel_pos" in name or "pos_embed" in name:
                    param.normal_(std=0.02)
    return model


def flops_table() -> None:
    import torch

    from samedge.models.highpass import HighPass

    highpass = HighPass(SIZE, SIZE, 0.25).flops()
    print(f"FLOPs per 1024² image (FFT high-pass as matrix products: {highpass / 1e9:.2f} GFLOP; "
          f"torch.fft's own transforms ≈ {3 * 2 * 2 * SIZE * 5 * SIZE * np.log2(SIZE) / 1e9:.2f} "
          "GFLOP by 5·n·log2 n)")
    print("| variant | encoder without the high-pass | high-pass | share of the encoder |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        model = reference(variant, "meta")
        encoder = count_flops(lambda: model.image_encoder(torch.empty(1, 3, SIZE, SIZE, device="meta")),
                              model)
        print(f"| {variant} | {encoder / 1e9:.1f} GFLOP | {highpass / 1e9:.2f} GFLOP | "
              f"{highpass / (encoder + highpass):.2%} |")


def export(module, example, path: Path) -> Path:
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["out"])
    return path


def openvino_profile(path: Path, tensor: np.ndarray, threads: int, rounds: int) -> tuple[float, float]:
    """(median ms of the /highpass/ nodes, median ms of all nodes) in the compiled encoder."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
    request.infer({0: tensor})
    highpass, total = [], []
    for _ in range(rounds):
        time.sleep(0.05)
        request.infer({0: tensor})
        times = [(i.node_name, i.real_time.total_seconds() * 1e3) for i in request.profiling_info]
        highpass.append(sum(t for name, t in times if "/highpass/" in name))
        total.append(sum(t for _, t in times))
    return statistics.median(highpass), statistics.median(total)


def time_table(variant: str, threads: int, rounds: int) -> None:
    import torch

    from samedge.models.highpass import HighPass, upstream_highpass
    from samedge.models.sam_adapter import merge_sam_adapter
    from samedge.runtime.backends import open_backend

    torch.set_num_threads(threads)
    merged = merge_sam_adapter(reference(variant)).image_encoder.eval()
    example = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    tensor = example.numpy()
    with tempfile.TemporaryDirectory(prefix="samedge-highpass-") as folder:
        print(f"\n{variant}: exporting the encoder and the high-pass alone ...", flush=True)
        encoder_path = export(merged, example, Path(folder) / "encoder.onnx")
        highpass_path = export(HighPass(SIZE, SIZE, 0.25), example, Path(folder) / "highpass.onnx")
        sessions = {(b, g): open_backend(b, p, threads) for b in ("onnxruntime", "openvino")
                    for g, p in (("encoder", encoder_path), ("high-pass", highpass_path))}
        calls = [[lambda s=s: s.run({"image": tensor})] for s in sessions.values()]
        with torch.no_grad():
            calls.append([lambda: merged.highpass(example)])
            calls.append([lambda: upstream_highpass(example, 0.25)])
            calls.append([lambda: merged(example)])
        samples = interleaved(calls, rounds=rounds, warmup=1, settle_s=0.05)
        median = [statistics.median(s[0]) * 1e3 for s in samples]
        hp_ms, all_ms = openvino_profile(encoder_path, tensor, threads, rounds)
    times = dict(zip([*sessions, ("torch", "high-pass"), ("torch", "torch.fft"),
                      ("torch", "encoder")], median))
    print(f"| {variant}, 1024², {threads} threads | encoder | high-pass alone | share |")
    print("|---|---|---|---|")
    for backend in ("onnxruntime", "openvino"):
        enc, hp = times[(backend, "encoder")], times[(backend, "high-pass")]
        print(f"| {backend} FP32 | {enc:.0f} ms | {hp:.0f} ms | {hp / enc:.1%} |")
    enc = times[("torch", "encoder")]
    print(f"| PyTorch eager FP32 | {enc:.0f} ms | {times[('torch', 'high-pass')]:.0f} ms "
          f"(torch.fft: {times[('torch', 'torch.fft')]:.0f} ms) | "
          f"{times[('torch', 'high-pass')] / enc:.1%} |")
    print(f"OpenVINO node profile of the encoder: /highpass/ nodes {hp_ms:.0f} ms of {all_ms:.0f} ms "
          f"({hp_ms / all_ms:.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time", nargs="*", default=["vit_b"], choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()} ({isa_summary()}), load {loadavg()}")
    flops_table()
    for variant in args.time:
        time_table(variant, args.threads, args.rounds)


if __name__ == "__main__":
    main()
