"""The workload every benchmark shares: the machine's load and GEMM rate, the bundled 512² CT,
its boxes, FLOP counts, and a LiteMedSAM bundle (given, or exported to a temp folder)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# -- machine -------------------------------------------------------------------------------------
def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# -- workload ------------------------------------------------------------------------------------
def pick_image(index: int):
    from samedge.data.bundled import bundled_slices

    slices = bundled_slices()
    chosen = slices[index]
    return chosen.name, chosen.image


def make_boxes(image: np.ndarray, count: int) -> np.ndarray:
    """``count`` distinct boxes: auto_boxes' five, repeated with small deterministic shifts."""
    from samedge.data.prompts import auto_boxes

    base = auto_boxes(image).astype(np.float64)
    height, width = image.shape[:2]
    boxes = []
    for i in range(count):
        box = base[i % len(base)].copy()
        shift = 3.0 * (i // len(base))
        box += [shift, shift, -shift, -shift]
        box[[0, 2]] = np.clip(box[[0, 2]], 0, width)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, height)
        if box[2] <= box[0] or box[3] <= box[1]:
            box = base[i % len(base)]
        boxes.append(box)
    return np.asarray(boxes, dtype=np.float32)


def count_flops(fn, *modules) -> float:
    """FLOPs (2 per multiply-add) that ``fn`` runs, counted by torch's FlopCounterMode.

    Parameters of ``modules`` are frozen meanwhile: the counter's module tracker asserts on
    parameters that require grad but come back without a grad_fn under no_grad."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for p in params:
            p.requires_grad_(True)
    return float(counter.get_total_flops())


def gemm_seconds(size: int = 2048):
    """One timed float32 ``torch.mm`` of size² × size² (threads set by the caller)."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)

    def run():
        start = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - start

    return run, 2.0 * size**3


def bundle_or_export(path: str | None):
    """(bundle folder, temp dir to clean up or None): ``path`` itself, or a fresh LiteMedSAM
    export (real weights, calibration-free) in a temporary folder."""
    if path:
        return Path(path), None
    from samedge.data.bundled import bundled_slices
    from samedge.export.exporter import export_bundle
    from samedge.models import build_model

    tmp = tempfile.TemporaryDirectory(prefix="samedge-bench-")
    bundle = Path(tmp.name) / "bundle"
    print("exporting a bundle (encoder + decoder, ONNX + OpenVINO IR) ...", flush=True)
    started = time.perf_counter()
    export_bundle(build_model("litemedsam"), bundle, [s.image for s in bundled_slices()[:2]])
    print(f"  exported in {time.perf_counter() - started:.0f} s")
    return bundle, tmp
