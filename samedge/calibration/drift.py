"""Drift of every bundle variant against the FP32 PyTorch model, measured through the real runtime.

Masks are compared with the FP32 model's *own* masks, never with annotations: against weak
reference masks a broken INT8 model that fills the box can score higher than FP32, so only
agreement with FP32 says whether quantization hurt. The runtime under test is the bedside
``Predictor``, not a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from samedge.calibration.prompts import auto_boxes, box_centres
from samedge.calibration.sources import Slice
from samedge.models.card import ModelCard
from samedge.models.reference import TorchReference
from samedge.progress import Steps
from samedge.runtime.bundle import Bundle
from samedge.runtime.predictor import Predictor


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; two empty masks agree perfectly."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@dataclass
class PromptSet:
    """The prompts one slice is decoded with: boxes, and for point-trained families single clicks
    at their centres. Box-only families (LiteMedSAM, MedSAM) never saw clicks in training; their
    click masks are a few unstable pixels, so clicks would measure noise, not drift."""

    boxes: np.ndarray
    clicks: np.ndarray | None = None

    @classmethod
    def auto(cls, image: np.ndarray, clicks: bool) -> "PromptSet":
        boxes = auto_boxes(image)
        return cls(boxes=boxes, clicks=box_centres(boxes) if clicks else None)


@dataclass
class ReferenceOutputs:
    """FP32 torch outputs for one slice, computed once and shared by every variant."""

    name: str
    embedding: np.ndarray
    box_logits: np.ndarray
    box_low_res: np.ndarray
    box_scores: np.ndarray
    click_logits: np.ndarray | None


@dataclass
class VariantDrift:
    backend: str
    precision: str
    dice: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    embedding_max_abs: float = 0.0
    embedding_cosine_min: float = 1.0
    logits_max_abs: float = 0.0
    logits_mean_abs: list[float] = field(default_factory=list)
    score_max_abs: float = 0.0
    cases: list[tuple[str, str, float]] = field(default_factory=list)

    def summary(self, worst_k: int = 5) -> dict:
        """What goes into the manifest next to the engine file."""
        dices = np.array(self.dice)
        worst = sorted(self.cases, key=lambda c: c[2])[:worst_k]
        return {
            "prompts": len(self.dice),
            "dice_mean": float(dices.mean()), "dice_min": float(dices.min()),
            "iou_mean": float(np.mean(self.iou)), "iou_min": float(np.min(self.iou)),
            "embedding_max_abs": self.embedding_max_abs,
            "embedding_cosine_min": self.embedding_cosine_min,
            "logits_max_abs": self.logits_max_abs,
            "logits_mean_abs": float(np.mean(self.logits_mean_abs)),
            "iou_prediction_max_abs": self.score_max_abs,
            "worst": [{"slice": s, "prompt": p, "dice": d} for s, p, d in worst],
        }


def reference_outputs(card: ModelCard, slices: Sequence[Slice],
                      prompts: Callable[[np.ndarray], PromptSet], steps: Steps
                      ) -> list[tuple[ReferenceOutputs, PromptSet]]:
    reference = TorchReference(card)
    results = []
    for item in steps.track(slices, "FP32 PyTorch reference", total=len(slices)):
        prompt = prompts(item.image)
        embedding = reference.set_image(item.image).numpy()
        boxes = reference.predict(boxes=prompt.boxes, multimask_output=False)
        clicks = None
        if prompt.clicks is not None:
            clicks = reference.predict(point_coords=prompt.clicks, multimask_output=False,
                                       point_labels=np.ones(prompt.clicks.shape[:2]))["logits"]
        results.append((ReferenceOutputs(item.name, embedding, boxes["logits"],
                                         boxes["low_res_logits"], boxes["scores"], clicks),
                        prompt))
    return results


def measure_variant(bundle: Bundle, backend: str, precision: str, slices: Sequence[Slice],
                    references: list[tuple[ReferenceOutputs, PromptSet]], steps: Steps,
                    threads: int | None = None, decoder_precision: str | None = None
                    ) -> VariantDrift:
    """Run one backend/precision through the Predictor and compare with the references."""
    predictor = Predictor(bundle, backend=backend, precision=precision, threads=threads,
                          decoder_precision=decoder_precision)
    drift = VariantDrift(backend, precision)
    pairs = list(zip(slices, references))
    for item, (ref, prompt) in steps.track(pairs, f"{backend} {precision}", total=len(pairs)):
        predictor.set_image(item.image)
        emb = predictor.image_embedding
        drift.embedding_max_abs = max(drift.embedding_max_abs,
                                      float(np.abs(emb - ref.embedding).max()))
        drift.embedding_cosine_min = min(drift.embedding_cosine_min, cosine(emb, ref.embedding))
        boxes = predictor.predict(boxes=prompt.boxes, multimask_output=False, return_logits=True)
        pairs = [("box", boxes.masks, ref.box_logits)]
        if prompt.clicks is not None:
            clicks = predictor.predict(point_coords=prompt.clicks,
                                       point_labels=np.ones(prompt.clicks.shape[:2]),
                                       multimask_output=False, return_logits=True)
            pairs.append(("click", clicks.masks, ref.click_logits))
        err = np.abs(boxes.low_res_logits - ref.box_low_res)
        drift.logits_max_abs = max(drift.logits_max_abs, float(err.max()))
        drift.logits_mean_abs.append(float(err.mean()))
        drift.score_max_abs = max(drift.score_max_abs,
                                  float(np.abs(boxes.scores - ref.box_scores).max()))
        for kind, got, want in pairs:
            for index in range(got.shape[0]):
                a, b = got[index, 0] > 0, want[index, 0] > 0
                drift.dice.append(dice(a, b))
                drift.iou.append(iou(a, b))
                drift.cases.append((item.name, f"{kind} {index}", drift.dice[-1]))
    return drift


def measure_drift(card: ModelCard, bundle_path: Path, slices: Sequence[Slice],
                  variants: Sequence[tuple[str, str]], steps: Steps | None = None,
                  threads: int | None = None) -> dict[tuple[str, str], VariantDrift]:
    """Drift of each (backend, precision) variant over the slices, with auto-derived prompts."""
    steps = steps or Steps(quiet=True)
    clicks = card.prompt == "points"
    references = reference_outputs(card, slices, lambda image: PromptSet.auto(image, clicks),
                                   steps)
    bundle = Bundle(bundle_path)
    return {
        (backend, precision): measure_variant(bundle, backend, precision, slices, references,
                                              steps, threads)
        for backend, precision in variants
    }

