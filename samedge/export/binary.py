"""The binary prompt-free decoder graph (SAM-Adapter): slice embeddings in, [0, mask 0] out.

Upstream decodes with an empty sparse prompt and ``multimask_output=False``, then thresholds
``sigmoid`` at 0.5. The graph is the semantic decoder (all mask tokens go through the
transformer, as upstream computes them) keeping mask token 0 and prepending a zero channel, so
the runtime's semantic path (``segment()``: argmax → label 1 where the logit is > 0) and the
label-map drift metrics serve it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from samedge.export.graphs import GraphSpec, Tolerance
from samedge.export.semantic import SemanticDecoder, export_prompt_free
from samedge.models.card import ModelCard
from samedge.models.sam_adapter import foreground_logits
from samedge.progress import Steps


class BinaryDecoder(SemanticDecoder):
    """``image_embeddings`` (N, C, h, w) → ``class_logits`` (N, 2, m, m) = [0, mask 0 logit],
    ``iou_predictions`` (N, 1) of mask 0."""

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, iou = super().forward(image_embeddings)
        return foreground_logits(logits[:, :1]), iou[:, :1]


def binary_decoder_spec(card: ModelCard) -> GraphSpec:
    """Declared against upstream's decoding: 1e-4 absolute on every logit."""
    emb, m = card.embedding_shape, card.preprocessing.mask_size
    return GraphSpec(
        "decoder",
        inputs={"image_embeddings": ("images", *emb)},
        outputs={"class_logits": ("images", 2, m, m), "iou_predictions": ("images", 1)},
        tolerances={"class_logits": Tolerance(atol=1e-4), "iou_predictions": Tolerance(atol=1e-4)},
    )


def export_binary_decoder(card: ModelCard, embeddings: Sequence[np.ndarray],
                          images: Sequence[np.ndarray], stage: Path, steps: Steps) -> dict:
    """SAM-Adapter's binary decoder (mask token 0), validated like the semantic decoders."""
    return export_prompt_free(card, BinaryDecoder(card.model), binary_decoder_spec(card),
                              "binary", "no prompt, mask token 0", embeddings, stage, steps)
