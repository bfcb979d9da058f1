"""The semantic decoder graph of SAMed and MA-SAM: slice embeddings in, K+1 class logits out.

Upstream decodes without prompts (``forward_train`` with points = boxes = masks = None): the
sparse prompt is empty and the dense one is ``no_mask_embed``, so both are constants here and the
prompt encoder is not in the graph. All K+1 mask tokens (background + classes) are returned, at 4×
the token grid (SAMed: m = S/4) or, through MA-SAM's 4-stage upscaler, at the input size (m = S).
Slices decode independently, so the slice count N is a dynamic axis: a depth model's D slices go
through in one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from samedge.export.graphs import GraphSpec, Tolerance
from samedge.export.onnx import export_graph, validate_graph
from samedge.models.card import ModelCard
from samedge.models.samed import semantic_decode
from samedge.progress import Steps


class SemanticDecoder(nn.Module):
    """``image_embeddings`` (N, C, h, w) → ``class_logits`` (N, K+1, m, m), ``iou_predictions``
    (N, K+1): SAM's ``predict_masks`` with the output tokens, dense prompt and positional
    encoding baked as constants and expanded to the N slices (upstream broadcasts one token batch
    against them; the products are the same)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        decoder, prompt = model.mask_decoder, model.prompt_encoder
        self.transformer = decoder.transformer
        self.output_upscaling = decoder.output_upscaling
        self.output_hypernetworks_mlps = decoder.output_hypernetworks_mlps
        self.iou_prediction_head = decoder.iou_prediction_head
        with torch.no_grad():
            tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
            self.register_buffer("tokens", tokens[None].clone())
            self.register_buffer("dense", prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).clone())
            self.register_buffer("dense_pe", prompt.get_dense_pe().clone())

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = image_embeddings.shape[0]
        src = image_embeddings + self.dense
        channels, height, width = src.shape[1:]
        hs, src = self.transformer(src, self.dense_pe.expand(count, -1, -1, -1),
                                   self.tokens.expand(count, -1, -1))
        mask_out = hs[:, 1 : 1 + len(self.output_hypernetworks_mlps), :]
        src = src.transpose(1, 2).reshape(count, channels, height, width)
        upscaled = self.output_upscaling(src)
        hyper = torch.stack(
            [mlp(mask_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        up_c, up_h, up_w = upscaled.shape[1:]
        logits = torch.matmul(hyper, upscaled.reshape(count, up_c, up_h * up_w))
        return logits.reshape(count, -1, up_h, up_w), self.iou_prediction_head(hs[:, 0, :])


def semantic_decoder_spec(card: ModelCard) -> GraphSpec:
    """Declared against the unmerged upstream decoding: 1e-4 absolute on every logit."""
    emb, m, k = card.embedding_shape, card.preprocessing.mask_size, card.num_mask_tokens
    return GraphSpec(
        "decoder",
        inputs={"image_embeddings": ("images", *emb)},
        outputs={"class_logits": ("images", k, m, m), "iou_predictions": ("images", k)},
        tolerances={"class_logits": Tolerance(atol=1e-4), "iou_predictions": Tolerance(atol=1e-4)},
    )


def semantic_cases(embeddings: Sequence[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Each encoder batch as it came (one slice, or a depth model's D), then all at once."""
    for batch in embeddings:
        yield {"image_embeddings": batch}
    yield {"image_embeddings": np.concatenate(embeddings)}


def export_prompt_free(card: ModelCard, decoder: torch.nn.Module, spec: GraphSpec, kind: str,
                       what: str, embeddings: Sequence[np.ndarray], stage: Path,
                       steps: Steps) -> dict:
    """Export a prompt-free decoder to ``stage/decoder.onnx`` and validate it against the
    upstream decoding of ``card.reference`` on the real slices' embeddings; returns the
    manifest's graph entry (``kind``: semantic or binary)."""
    path = stage / "decoder.onnx"
    truth = card.reference if card.reference is not None else card.model
    with steps.step(f"export {kind} decoder ({what}) to ONNX"):
        export_graph(decoder.eval(), spec, (torch.from_numpy(embeddings[0]),), path)
    with steps.step(f"validate {kind} decoder on {sum(map(len, embeddings))} real slices"):
        measured = validate_graph(path, spec, lambda e: semantic_decode(truth, e),
                                  semantic_cases(embeddings))
    return {"variant": kind, **spec.describe(), "measured": measured}


def export_semantic_decoder(card: ModelCard, embeddings: Sequence[np.ndarray],
                            images: Sequence[np.ndarray], stage: Path, steps: Steps) -> dict:
    """SAMed/MA-SAM's class-logit decoder (SAMed_s: validated with its decoder LoRA still
    unmerged); ``images`` are unused: the decoder takes no prompt."""
    return export_prompt_free(card, SemanticDecoder(card.model), semantic_decoder_spec(card),
                              "semantic", "no prompt, K+1 class logits", embeddings, stage, steps)
