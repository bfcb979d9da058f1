"""ModelCard: a torch model together with the facts its export and runtime depend on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from samedge.runtime.transforms import Preprocessing


@dataclass
class ModelCard:
    """A built model described as data.

    ``model`` exposes SAM's three parts (``image_encoder``, ``prompt_encoder``, ``mask_decoder``);
    everything else says how to feed it and read it, and is copied into the bundle's manifest.
    ``multimask_default`` is the family's own convention (LiteMedSAM and MedSAM were trained with a
    single output token, SAM answers ambiguous prompts with three). ``decoder="semantic"`` marks
    prompt-free class-logit decoders (SAMed, MA-SAM); ``depth`` > 1 an encoder that takes a stack
    of adjacent slices (Med-SA 3D, MA-SAM). ``reference`` is the unmerged, upstream-faithful model
    of an adaptation family (LoRA/FacT applied as upstream does), kept as ground truth for merge and
    export parity; ``model`` is then the merged, exportable one and shares its unchanged submodules.
    """

    family: str
    variant: str
    model: torch.nn.Module
    preprocessing: Preprocessing
    prompt: Literal["boxes", "points", "none"] = "boxes"
    multimask_default: bool = False
    decoder: Literal["prompt", "semantic"] = "prompt"
    depth: int = 1
    checkpoint: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reference: torch.nn.Module | None = None

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        pe = self.model.prompt_encoder
        return (pe.embed_dim, *pe.image_embedding_size)

    @property
    def num_mask_tokens(self) -> int:
        return int(self.model.mask_decoder.num_mask_tokens)

    def describe(self) -> dict:
        """The manifest's ``model`` section."""
        return {
            "family": self.family,
            "variant": self.variant,
            "image_size": self.image_size,
            "embedding_shape": list(self.embedding_shape),
            "num_mask_tokens": self.num_mask_tokens,
            "mask_size": self.preprocessing.mask_size,
            "prompt": self.prompt,
            "multimask_default": self.multimask_default,
            "decoder": self.decoder,
            "depth": self.depth,
            "checkpoint": self.checkpoint,
            "notes": self.notes,
        }
