"""Decoder graphs by kind, and the realistic prompt cases they are validated on.

A family names its kind in its :class:`~samedge.models.family.Family` spec (``decoder_graph``);
``exporter.DECODER_EXPORTS`` maps each kind to the function that exports and validates it, all with
one signature, so the exporter holds no family branches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from samedge.data.prompts import auto_boxes
from samedge.export.graphs import PromptDecoder, decoder_spec
from samedge.export.onnx import export_graph, validate_graph
from samedge.models.card import ModelCard
from samedge.progress import Steps
from samedge.runtime.transforms import preprocess, transform_boxes


def decoder_cases(card: ModelCard, embeddings: Sequence[np.ndarray],
                  images: Sequence[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Realistic decoder inputs: real embeddings, boxes from the real slices, point sets of
    several sizes, prompt batches of 1, 5 and 16, with and without a mask prompt."""
    m = card.preprocessing.mask_size
    rng = np.random.default_rng(0)
    for embedding, image in zip(embeddings, images):
        _, frame = preprocess(image, card.preprocessing)
        corners = transform_boxes(auto_boxes(image), frame, card.preprocessing)  # (5, 2, 2)
        centres = corners.mean(axis=1, keepdims=True)
        box_labels = np.broadcast_to(np.float32([2, 3]), (len(corners), 2))
        layouts = [
            (corners[:1], box_labels[:1]),                                       # B=1, box
            (corners, box_labels),                                               # B=5, box
            (np.concatenate([centres, np.zeros_like(centres)], 1),               # B=5, click+pad
             np.tile(np.float32([1, -1]), (len(corners), 1))),
            (np.concatenate([np.repeat(centres, 3, 1) + rng.normal(0, 2, (5, 3, 2)), corners], 1),
             np.tile(np.float32([1, 0, 1, 2, 3]), (len(corners), 1))),          # B=5, N=5
            (np.tile(corners, (4, 1, 1))[:16], np.tile(box_labels, (4, 1))[:16]),  # B=16
        ]
        for index, (coords, labels) in enumerate(layouts):
            count = coords.shape[0]
            with_mask = index == 1
            yield {
                "image_embeddings": embedding,
                "point_coords": np.ascontiguousarray(coords, dtype=np.float32),
                "point_labels": np.ascontiguousarray(labels, dtype=np.float32),
                "mask_input": (rng.normal(0, 4, (count, 1, m, m)) if with_mask
                               else np.zeros((count, 1, m, m))).astype(np.float32),
                "has_mask_input": np.full(count, float(with_mask), np.float32),
            }


def sam_interface_cases(card, embeddings, images):
    """Meta's decoder takes one prompt with N points, coordinates in the resized frame, and the
    original image size; without a box a pad point is appended."""
    layouts = 5  # decoder_cases yields five prompt layouts per image
    for case, image in zip(decoder_cases(card, embeddings, images), _repeat(images, layouts)):
        yield {
            "image_embeddings": case["image_embeddings"],
            "point_coords": case["point_coords"][:1],
            "point_labels": case["point_labels"][:1],
            "mask_input": case["mask_input"][:1],
            "has_mask_input": case["has_mask_input"][:1],
            "orig_im_size": np.float32(image.shape[:2]),
        }


def _repeat(items, times):
    for item in items:
        for _ in range(times):
            yield item


def export_prompt_decoder(card: ModelCard, embeddings: Sequence[np.ndarray],
                          images: Sequence[np.ndarray], stage: Path, steps: Steps) -> dict:
    """The spine's prompt decoder, exported to ``stage/decoder.onnx`` and validated on prompt
    batches of 1, 5 and 16 with 1–5 points; returns the manifest's graph entry."""
    decoder = PromptDecoder(card.model, card.image_size).eval()
    cases = list(decoder_cases(card, embeddings[:2], images[:2]))
    return export_and_validate(decoder, decoder, decoder_spec(card), cases, stage, steps,
                               "B = 1…16 prompts, N = 1…5 points", {})


def export_and_validate(decoder, reference, spec, cases: list, stage: Path, steps: Steps,
                        title: str, facts: dict) -> dict:
    """Export a prompt decoder, validate it against ``reference`` on ``cases``."""
    path = stage / "decoder.onnx"
    with steps.step("export prompt encoder + mask decoder to ONNX"):
        export_graph(decoder, spec, tuple(torch.tensor(cases[0][n]) for n in spec.inputs), path)
    with steps.step(f"validate decoder ({title})"):
        measured = validate_graph(path, spec, reference, cases)
    return {"variant": "prompt", **facts, **spec.describe(), "measured": measured}
