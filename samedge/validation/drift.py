"""Drift of every bundle variant against the FP32 PyTorch model, measured through the real runtime.

Masks are compared with the FP32 model's *own* masks, never with annotations: against weak
reference masks a broken INT8 model that fills the box can score higher than FP32, so only
agreement with FP32 says whether quantization hurt. The runtime under test is the bedside
``Predictor``, not a copy of it.

Semantic families (SAMed, MA-SAM) have no prompts: their label maps are compared pixel by pixel
(share of identical labels, Dice per class). Depth models are fed stacks of D adjacent slices, and
prompts are decoded on each stack's centre slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from samedge.data.bundled import bundled_stacks
from samedge.data.items import Item
from samedge.data.prompts import PromptSet
from samedge.data.slices import Slice
from samedge.progress import Steps
from samedge.runtime.bundle import Bundle
from samedge.runtime.predictor import Predictor

if TYPE_CHECKING:  # torch only where a PyTorch reference is computed: engines are measured on
    # devices without torch against the FP32 ONNX (samedge.validation.engines)
    from samedge.models.card import ModelCard
    from samedge.models.reference import TorchReference


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




def output_errors(drift) -> dict:
    """Embedding and logit error summary, shared by prompt and semantic drift records."""
    return {
        "embedding_max_abs": drift.embedding_max_abs,
        "embedding_cosine_min": drift.embedding_cosine_min,
        **({"embedding_cosine_mean": float(np.mean(drift.embedding_cosine)),
            "embedding_rel_err_max": float(np.max(drift.embedding_rel_err))}
           if drift.embedding_cosine else {}),
        "logits_max_abs": drift.logits_max_abs,
        "logits_mean_abs": float(np.mean(drift.logits_mean_abs)),
    }


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
    # per slice: embedding cosine and relative L2 error ||e - e32|| / ||e32|| (quantization drift)
    embedding_cosine: list[float] = field(default_factory=list)
    embedding_rel_err: list[float] = field(default_factory=list)

    def summary(self, worst_k: int = 5) -> dict:
        """What goes into the manifest next to the engine file."""
        dices = np.array(self.dice)
        worst = sorted(self.cases, key=lambda c: c[2])[:worst_k]
        return {
            "prompts": len(self.dice),
            "dice_mean": float(dices.mean()), "dice_min": float(dices.min()),
            "iou_mean": float(np.mean(self.iou)), "iou_min": float(np.min(self.iou)),
            **output_errors(self),
            "iou_prediction_max_abs": self.score_max_abs,
            "worst": [{"slice": s, "prompt": p, "dice": d} for s, p, d in worst],
        }


def encode(target: Predictor | TorchReference, item: Item) -> Slice:
    """``set_image`` a slice or ``set_volume`` a stack; returns the slice prompts are decoded on
    (a stack's centre, which both select after ``set_volume``)."""
    if isinstance(item, Slice):
        target.set_image(item.image)
        return item
    target.set_volume([s.image for s in item])
    return item[len(item) // 2]


def reference_outputs(card: ModelCard, slices: Sequence[Item],
                      prompts: Callable[[np.ndarray], PromptSet], steps: Steps
                      ) -> list[tuple[ReferenceOutputs, PromptSet]]:
    from samedge.models.reference import TorchReference

    reference = TorchReference(card)
    results = []
    for entry in steps.track(slices, "FP32 PyTorch reference", total=len(slices)):
        item = encode(reference, entry)
        prompt = prompts(item.image)
        embedding = reference.embedding.numpy()
        boxes = reference.predict(boxes=prompt.boxes, multimask_output=False)
        clicks = None
        if prompt.clicks is not None:
            clicks = reference.predict(point_coords=prompt.model_clicks(card.preprocessing),
                                       point_labels=np.ones(prompt.clicks.shape[:2]),
                                       multimask_output=False)["logits"]
        results.append((ReferenceOutputs(item.name, embedding, boxes["logits"],
                                         boxes["low_res_logits"], boxes["scores"], clicks),
                        prompt))
    return results


def record_embedding(drift: "VariantDrift | SemanticDrift", got: np.ndarray,
                     want: np.ndarray) -> None:
    """Embedding drift of one item: max abs error, cosine, relative L2 error."""
    similarity = cosine(got, want)
    drift.embedding_max_abs = max(drift.embedding_max_abs, float(np.abs(got - want).max()))
    drift.embedding_cosine_min = min(drift.embedding_cosine_min, similarity)
    drift.embedding_cosine.append(similarity)
    drift.embedding_rel_err.append(float(np.linalg.norm(got - want)
                                         / max(np.linalg.norm(want), 1e-12)))


def measure_variant(bundle: Bundle, backend: str, precision: str, slices: Sequence[Item],
                    references: list[tuple[ReferenceOutputs, PromptSet]], steps: Steps,
                    threads: int | None = None, decoder_precision: str | None = None,
                    predictor: Predictor | None = None,
                    observe: Callable | None = None) -> VariantDrift:
    """Run one backend/precision through the Predictor and compare with the references.

    ``predictor``: an already opened Predictor (e.g. with a candidate graph not yet in a bundle);
    ``observe(item, kind, index, got_mask, want_mask, dice)`` sees every prompt's boolean masks.
    """
    if predictor is None:
        predictor = Predictor(bundle, backend=backend, precision=precision, threads=threads,
                              decoder_precision=decoder_precision)
    drift = VariantDrift(backend, precision)
    pairs = list(zip(slices, references))
    for entry, (ref, prompt) in steps.track(pairs, f"{backend} {precision}", total=len(pairs)):
        item = encode(predictor, entry)
        emb = predictor.image_embedding
        record_embedding(drift, emb, ref.embedding)
        boxes = predictor.predict(boxes=prompt.boxes, multimask_output=False, return_logits=True)
        pairs = [("box", boxes.masks, ref.box_logits)]
        if prompt.clicks is not None:
            clicks = predictor.predict(point_coords=prompt.model_clicks(predictor.pre),
                                       point_labels=np.ones(prompt.clicks.shape[:2]),
                                       multimask_output=False, return_logits=True)
            pairs.append(("click", clicks.masks, ref.click_logits))
        err = np.abs(boxes.low_res_logits - ref.box_low_res)
        drift.logits_max_abs = max(drift.logits_max_abs, float(err.max()))
        drift.logits_mean_abs.append(float(err.mean()))
        drift.score_max_abs = max(drift.score_max_abs,
                                  float(np.abs(boxes.scores - ref.box_scores).max()))
        threshold = predictor.pre.mask_threshold  # logits > 0, or MedSAM's probabilities > 0.5
        for kind, got, want in pairs:
            for index in range(got.shape[0]):
                a, b = got[index, 0] > threshold, want[index, 0] > threshold
                drift.dice.append(dice(a, b))
                drift.iou.append(iou(a, b))
                drift.cases.append((item.name, f"{kind} {index}", drift.dice[-1]))
                if observe is not None:
                    observe(item, kind, index, a, b, drift.dice[-1])
    return drift


def measure_drift(card: ModelCard, bundle_path: Path, slices: Sequence[Slice],
                  variants: Sequence[tuple[str, str]], steps: Steps | None = None,
                  threads: int | None = None, stacks: Sequence[Sequence[Slice]] | None = None
                  ) -> dict[tuple[str, str], VariantDrift | SemanticDrift]:
    """Drift of each (backend, precision) variant over the slices, with auto-derived prompts
    (none for semantic families). Depth models are measured on ``stacks`` instead (default:
    three stacks of the bundled MR volume), since the given slices are no stack."""
    steps = steps or Steps(quiet=True)
    items: Sequence[Item] = slices
    if card.depth > 1:
        items = stacks if stacks is not None else bundled_stacks(card.depth, count=3)
    bundle = Bundle(bundle_path)
    if card.decoder == "semantic":
        labels = semantic_references(card, items, steps)
        return {(backend, precision): measure_semantic_variant(bundle, backend, precision, items,
                                                               labels, steps, threads)
                for backend, precision in variants}
    clicks = card.prompt == "points"
    references = reference_outputs(card, items, lambda image: PromptSet.auto(image, clicks),
                                   steps)
    return {
        (backend, precision): measure_variant(bundle, backend, precision, items, references,
                                              steps, threads)
        for backend, precision in variants
    }


# -- semantic families ------------------------------------------------------------------------
def class_dice(got: np.ndarray, want: np.ndarray) -> dict[int, float]:
    """Dice per class present in either label map (absent in both says nothing)."""
    return {int(c): dice(got == c, want == c) for c in np.union1d(np.unique(got), np.unique(want))}


@dataclass
class SemanticReference:
    """FP32 torch outputs for one slice or stack: embeddings, low-res class logits, label maps."""

    name: str
    embeddings: np.ndarray
    low_res: np.ndarray
    labels: np.ndarray


@dataclass
class SemanticDrift:
    """Label-map agreement of one variant with FP32: per slice the share of identical pixels,
    per class the Dice of its region (background included). Each (slice, class) region is what a
    prompt is for the prompt families: ``cases`` and the ``dice_*`` figures the gates read pool
    them, so the same gate and report serve both."""

    backend: str
    precision: str
    agreement: list[float] = field(default_factory=list)
    class_dice: dict[int, list[float]] = field(default_factory=dict)
    embedding_max_abs: float = 0.0
    embedding_cosine_min: float = 1.0
    logits_max_abs: float = 0.0
    logits_mean_abs: list[float] = field(default_factory=list)
    cases: list[tuple[str, str, float]] = field(default_factory=list)
    embedding_cosine: list[float] = field(default_factory=list)
    embedding_rel_err: list[float] = field(default_factory=list)
    slice_names: list[str] = field(default_factory=list)

    def summary(self, worst_k: int = 5) -> dict:
        """What goes into the manifest; ``dice_*`` pool every class of every slice."""
        dices = np.array([d for _, _, d in self.cases])
        worst = sorted(self.cases, key=lambda c: c[2])[:worst_k]
        agreement = sorted(zip(self.slice_names, self.agreement), key=lambda c: c[1])
        return {
            "slices": len(self.agreement),
            "prompts": len(dices),
            "pixel_agreement_mean": float(np.mean(self.agreement)),
            "pixel_agreement_min": float(np.min(self.agreement)),
            "class_dice_mean": {c: float(np.mean(v)) for c, v in sorted(self.class_dice.items())},
            "class_dice_min": {c: float(np.min(v)) for c, v in sorted(self.class_dice.items())},
            "dice_mean": float(dices.mean()), "dice_min": float(dices.min()),
            **output_errors(self),
            "worst": [{"slice": s, "prompt": p, "dice": d} for s, p, d in worst],
            "worst_agreement": [{"slice": s, "pixel_agreement": a}
                                for s, a in agreement[:worst_k]],
        }


def _names(item: Item) -> list[str]:
    return [item.name] if isinstance(item, Slice) else [s.name for s in item]


def semantic_references(card: ModelCard, items: Sequence[Item], steps: Steps
                        ) -> list[SemanticReference]:
    from samedge.models.reference import TorchReference

    reference = TorchReference(card)
    results = []
    for item in steps.track(items, "FP32 PyTorch reference", total=len(items)):
        encode(reference, item)
        out = reference.segment()
        results.append(SemanticReference(" | ".join(_names(item)), reference.embeddings.numpy(),
                                         out["low_res_logits"], out["labels"]))
    return results


def measure_semantic_variant(bundle: Bundle, backend: str, precision: str, items: Sequence[Item],
                             references: list[SemanticReference], steps: Steps,
                             threads: int | None = None, decoder_precision: str | None = None,
                             predictor: Predictor | None = None,
                             observe: Callable | None = None) -> SemanticDrift:
    """Run one backend/precision through ``Predictor.segment`` and compare label maps.

    ``predictor`` and ``observe`` as in :func:`measure_variant`; ``observe`` sees each class
    region as ``(slice, "class", c, got_region, want_region, dice)`` (boolean masks)."""
    if predictor is None:
        predictor = Predictor(bundle, backend=backend, precision=precision, threads=threads,
                              decoder_precision=decoder_precision)
    drift = SemanticDrift(backend, precision)
    pairs = list(zip(items, references))
    for item, ref in steps.track(pairs, f"{backend} {precision}", total=len(pairs)):
        encode(predictor, item)
        result = predictor.segment()
        emb = predictor.embeddings
        record_embedding(drift, emb, ref.embeddings)
        err = np.abs(result.low_res_logits - ref.low_res)
        drift.logits_max_abs = max(drift.logits_max_abs, float(err.max()))
        drift.logits_mean_abs.append(float(err.mean()))
        slices = [item] if isinstance(item, Slice) else list(item)
        for piece, got, want in zip(slices, result.labels, ref.labels):
            drift.agreement.append(float((got == want).mean()))
            drift.slice_names.append(piece.name)
            for c, value in class_dice(got, want).items():
                drift.class_dice.setdefault(c, []).append(value)
                drift.cases.append((piece.name, f"class {c}", value))
                if observe is not None:
                    observe(piece, "class", c, got == c, want == c, value)
    return drift
