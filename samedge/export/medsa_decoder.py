"""Med-SA's prompt decoder graph: the spine's decoder, cut to Med-SA's output tokens 0:n.

Measured against Med-SA's own ``MaskDecoder`` (both transformer styles, one image with 1–16 click
prompts): the spine's :class:`PromptDecoder` reproduces it to the last bit. Its transformer is
called through the same signature, and Med-SA's ``predict_masks`` batching (repeat the image
embedding only when the prompt batch differs) is what ``expand`` computes. Only the output differs:
Med-SA returns tokens ``0:n`` for either multimask flag, where SAM's runtime picks 1: or 0:1. This
graph returns exactly Med-SA's tokens, and the manifest tells the runtime not to pick again.

Validation runs Med-SA's upstream path: ``prompt_encoder(points=..., boxes=None, masks=None)``
(which appends the padding point the runtime sends) and ``mask_decoder(...)``, on clicks, the
only prompt Med-SA trains and validates with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from samedge.data.prompts import auto_boxes
from samedge.export.decoders import export_and_validate
from samedge.export.graphs import GraphSpec, PromptDecoder, decoder_spec
from samedge.models.card import ModelCard
from samedge.progress import Steps
from samedge.runtime.transforms import preprocess, transform_boxes


class MedSAPromptDecoder(nn.Module):
    """The spine's I/O contract (``image_embeddings, point_coords, point_labels, mask_input,
    has_mask_input → low_res_masks, iou_predictions``) with Med-SA's n output tokens."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.decoder = PromptDecoder(model, image_size)
        self.outputs = int(model.mask_decoder.num_multimask_outputs)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        masks, iou = self.decoder(image_embeddings, point_coords, point_labels, mask_input,
                                  has_mask_input)
        return masks[:, : self.outputs], iou[:, : self.outputs]


def medsa_decoder_spec(card: ModelCard) -> GraphSpec:
    """The standard decoder contract with Med-SA's mask count (tokens chosen in the graph)."""
    return decoder_spec(card, int(card.model.mask_decoder.num_multimask_outputs))


def click_cases(card: ModelCard, embeddings: Sequence[np.ndarray],
                images: Sequence[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Click prompts on real slices, as the runtime sends them (model frame, pad point last):
    batches of 1, 5 and 16 prompts of one click, and 5 prompts of three (fg, bg, fg)."""
    m, pre = card.preprocessing.mask_size, card.preprocessing
    rng = np.random.default_rng(0)
    for embedding, image in zip(embeddings, images):
        _, frame = preprocess(image, pre)
        centres = transform_boxes(auto_boxes(image), frame, pre).mean(axis=1)  # (5, 2)
        layouts = [
            (centres[:1, None], np.ones((1, 1))),
            (centres[:, None], np.ones((5, 1))),
            (centres[:, None] + rng.normal(0, 3, (5, 3, 2)), np.tile([1.0, 0.0, 1.0], (5, 1))),
            (np.tile(centres, (4, 1))[:16, None], np.ones((16, 1))),
        ]
        for coords, labels in layouts:
            count = len(coords)
            pad_xy, pad_label = np.zeros((count, 1, 2)), np.full((count, 1), -1.0)
            yield {
                "image_embeddings": embedding,
                "point_coords": np.concatenate([coords, pad_xy], 1).astype(np.float32),
                "point_labels": np.concatenate([labels, pad_label], 1).astype(np.float32),
                "mask_input": np.zeros((count, 1, m, m), np.float32),
                "has_mask_input": np.zeros(count, np.float32),
            }


def upstream_decoder(model: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Med-SA's own decoding of the graph's inputs (clicks only; its prompt encoder appends the
    pad point the runtime already sent, so that one is dropped here)."""

    def decode(image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        assert not bool(has_mask_input.any()) and bool((point_labels[:, -1] == -1).all())
        points = (point_coords[:, :-1], point_labels[:, :-1].to(torch.int64))
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None)
        decoder = model.mask_decoder
        return decoder(image_embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense,
                       multimask_output=decoder.num_multimask_outputs > 1)

    return decode


def export_medsa_decoder(card: ModelCard, embeddings: Sequence[np.ndarray],
                         images: Sequence[np.ndarray], stage: Path, steps: Steps) -> dict:
    """Med-SA's decoder cut to its tokens 0:n, validated against Med-SA's upstream decoding."""
    decoder = MedSAPromptDecoder(card.model, card.image_size).eval()
    cases = list(click_cases(card, embeddings[:2], images[:2]))
    return export_and_validate(decoder, upstream_decoder(card.reference), medsa_decoder_spec(card),
                               cases, stage, steps, "Med-SA clicks (B = 1…16 prompts, 1–3 clicks)",
                               {"token_selection": "graph"})
