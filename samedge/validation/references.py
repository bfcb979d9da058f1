"""FP32 PyTorch references for a validation set, and measuring any variant against them.

Build, search and validate all ask the same two questions — "what does the FP32 model say on
these items?" (computed once) and "how far is this variant from it?" — for every family. The
answer differs by family, so it lives here once: prompt families compare masks per prompt (boxes,
and centre clicks for point-trained families); semantic families (SAMed, MA-SAM) compare label
maps per (slice, class) region; depth models are fed stacks of D adjacent slices, prompts decoded
on each stack's centre slice. Everything downstream (gates, search, report) reads the same
``cases`` and ``dice_*`` figures from either kind of drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from samedge.data.items import Item, centre, encoder_tensor
from samedge.data.prompts import PromptPolicy, PromptSet
from samedge.data.slices import Slice
from samedge.errors import SamedgeError
from samedge.progress import Steps
from samedge.runtime.bundle import Bundle
from samedge.runtime.predictor import Predictor
from samedge.runtime.transforms import Preprocessing
from samedge.validation.drift import (
    ReferenceOutputs,
    SemanticDrift,
    SemanticReference,
    VariantDrift,
    encode,
    measure_semantic_variant,
    measure_variant,
    reference_outputs,
    semantic_references,
)
from samedge.validation.rebuild import reference_card

PYTORCH_REFERENCE = "FP32 PyTorch, same preprocessing"
RUNTIME_REFERENCE = ("FP32 ONNX on ONNX Runtime CPU, same preprocessing (FP32 PyTorch not "
                     "available here: {why}; the FP32 ONNX matched it within the export "
                     "tolerance)")



def item_name(item: Item) -> str:
    return item.name if isinstance(item, Slice) else " | ".join(s.name for s in item)


@dataclass
class Measured:
    """Validation items (slices, or stacks of ``depth`` slices) with their FP32 references:
    ``(ReferenceOutputs, PromptSet)`` per item for prompt families, ``SemanticReference`` for
    semantic ones."""

    items: list[Item]
    references: list
    depth: int = 1
    semantic: bool = False

    @property
    def names(self) -> list[str]:
        return [item_name(item) for item in self.items]

    def prompts(self) -> dict[str, PromptSet]:
        """Prompt families: each decoded slice's prompts, by slice name."""
        if self.semantic:
            return {}
        return {centre(item).name: prompt for item, (_, prompt) in zip(self.items,
                                                                        self.references)}

    def subset(self, indices: Sequence[int]) -> "Measured":
        return Measured([self.items[i] for i in indices], [self.references[i] for i in indices],
                        self.depth, self.semantic)

    def measure(self, bundle: Bundle, backend: str, encoder: str = "fp32",
                decoder: str | None = None, threads: int | None = None,
                predictor: Predictor | None = None, observe: Callable | None = None,
                label: str | None = None) -> VariantDrift | SemanticDrift:
        """Drift of one variant (``predictor``: an opened one, e.g. with a candidate graph
        swapped in) on every item, through the runtime Predictor."""
        measure = measure_semantic_variant if self.semantic else measure_variant
        return measure(bundle, backend, label or encoder, self.items, self.references,
                       Steps(quiet=True), threads, decoder_precision=decoder,
                       predictor=predictor, observe=observe)

    def encoder_pairs(self, pre: Preprocessing, count: int
                      ) -> list[tuple[np.ndarray, np.ndarray, slice]]:
        """(encoder input, FP32 PyTorch embedding, which output slices it covers) for the first
        ``count`` items: every slice of a semantic stack, the centre of a prompt model's."""
        pairs = []
        for item, ref in list(zip(self.items, self.references))[:count]:
            tensor = encoder_tensor(item, pre, self.depth)[0]
            if self.semantic:
                pairs.append((tensor, ref.embeddings, slice(None)))
            else:
                mid = self.depth // 2
                pairs.append((tensor, ref[0].embedding, slice(mid, mid + 1)))
        return pairs


def references_for(card, items: Sequence[Item], policy: PromptPolicy, steps: Steps) -> Measured:
    """FP32 PyTorch outputs of ``card`` on ``items`` (stacks for depth models), once."""
    items = list(items)
    depth = int(getattr(card, "depth", 1))
    if card.decoder == "semantic":
        return Measured(items, semantic_references(card, items, steps), depth, semantic=True)
    lookup = {id(centre(item).image): centre(item) for item in items}
    references = reference_outputs(card, items, lambda image: policy.prompt_set(lookup[id(image)]),
                                   steps)
    return Measured(items, references, depth)


def runtime_references(bundle: Bundle, items: Sequence, policy: PromptPolicy,
                       steps: Steps) -> Measured:
    """FP32 references from the bundle's FP32 ONNX graphs on ONNX Runtime CPU: the same outputs
    :func:`references_for` takes from PyTorch, computed through the runtime ``Predictor``."""
    predictor = Predictor(bundle, backend="onnxruntime", precision="fp32")
    items = list(items)
    references: list = []
    for item in steps.track(items, "FP32 ONNX Runtime reference", total=len(items)):
        piece = encode(predictor, item)
        if predictor.semantic:
            out = predictor.segment()
            references.append(SemanticReference(item_name(item), predictor.embeddings.copy(),
                                                out.low_res_logits, out.labels))
            continue
        prompt = policy.prompt_set(piece)
        boxes = predictor.predict(boxes=prompt.boxes, multimask_output=False, return_logits=True)
        clicks = None
        if prompt.clicks is not None:
            clicks = predictor.predict(point_coords=prompt.model_clicks(predictor.pre),
                                       point_labels=np.ones(prompt.clicks.shape[:2]),
                                       multimask_output=False, return_logits=True).masks
        references.append((ReferenceOutputs(piece.name, predictor.image_embedding.copy(),
                                            boxes.masks, boxes.low_res_logits, boxes.scores,
                                            clicks), prompt))
    return Measured(items, references, int(bundle.model.get("depth", 1)), predictor.semantic)


def engine_references(bundle: Bundle, items: Sequence, policy: PromptPolicy, card,
                      steps: Steps) -> tuple[Measured, str]:
    """(references, what they are): FP32 PyTorch when the model can be rebuilt here, else the
    bundle's FP32 ONNX on ONNX Runtime CPU."""
    try:
        card = reference_card(bundle, card)
    except (ImportError, SamedgeError) as exc:
        why = str(exc).splitlines()[0]
        with steps.step(f"FP32 ONNX Runtime reference on {len(items)} items ({why})"):
            return (runtime_references(bundle, items, policy, Steps(quiet=True)),
                    RUNTIME_REFERENCE.format(why=why))
    with steps.step(f"FP32 PyTorch reference on {len(items)} items"):
        return references_for(card, items, policy, Steps(quiet=True)), PYTORCH_REFERENCE
