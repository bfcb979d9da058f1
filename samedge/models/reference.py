"""The FP32 PyTorch reference every exported graph and engine is judged against.

It shares the runtime's preprocessing (one definition, so drift measures the engine and not a
second resizer) but decodes through the upstream modules' own API — ``prompt_encoder(points=,
boxes=, masks=)`` and ``mask_decoder(..., multimask_output)`` — and upsamples with
``F.interpolate`` as SAM's ``postprocess_masks`` does, independently of the export wrappers.
Adaptation families are judged against their unmerged, upstream-faithful model (``card.reference``),
so drift covers the whole path from the checkpoint as its authors saved it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samedge.models.card import ModelCard
from samedge.models.samed import semantic_decode
from samedge.runtime.transforms import (
    ImageFrame,
    preprocess,
    preprocess_stack,
    transform_boxes,
    transform_points,
)


class TorchReference:
    def __init__(self, card: ModelCard):
        self.card = card
        self.model = (card.reference if card.reference is not None else card.model).eval()
        self.pre = card.preprocessing
        self.embeddings: torch.Tensor | None = None
        self.frame: ImageFrame | None = None
        self.slice = 0

    @property
    def embedding(self) -> torch.Tensor:
        """(1, C, h, w): the slice ``predict`` decodes against."""
        return self.embeddings[self.slice : self.slice + 1]

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> torch.Tensor:
        tensor, frame = preprocess(image, self.pre)
        self._encode(tensor, frame, 0)
        return self.embedding

    @torch.no_grad()
    def set_volume(self, stack) -> torch.Tensor:
        """D adjacent slices in one encoder call; ``predict`` then uses the centre slice."""
        tensor, frame = preprocess_stack(stack, self.pre, self.card.depth)
        self._encode(tensor, frame, self.card.depth // 2)
        return self.embeddings

    def _encode(self, tensor: np.ndarray, frame: ImageFrame, current: int) -> None:
        self.embeddings = self.model.image_encoder(torch.from_numpy(tensor))
        self.frame, self.slice = frame, current

    def select_slice(self, index: int) -> None:
        self.slice = index % len(self.embeddings)

    @torch.no_grad()
    def segment(self) -> dict[str, np.ndarray]:
        """Semantic families: class logits (N, K+1, m, m) and at the original size, label maps."""
        low_res, _ = semantic_decode(self.model, self.embeddings)
        logits = self.postprocess(low_res)
        return {"low_res_logits": low_res.numpy(), "logits": logits.numpy(),
                "labels": logits.argmax(dim=1).numpy()}

    @torch.no_grad()
    def predict(self, boxes=None, point_coords=None, point_labels=None,
                multimask_output: bool | None = None) -> dict[str, np.ndarray]:
        """Low-res logits (B, K, m, m), IoU scores (B, K) and logits at the original size."""
        multimask = self.card.multimask_default if multimask_output is None else multimask_output
        points = None
        if point_coords is not None:
            coords = transform_points(np.asarray(point_coords).reshape(-1, *np.shape(point_coords)[-2:]),
                                      self.frame, self.pre)
            labels = np.asarray(point_labels, np.float32).reshape(coords.shape[:2])
            points = (torch.from_numpy(coords), torch.from_numpy(labels).to(torch.int64))
        box_tensor = None
        if boxes is not None:
            corners = transform_boxes(np.asarray(boxes).reshape(-1, 4), self.frame, self.pre)
            box_tensor = torch.from_numpy(corners.reshape(-1, 4))
        sparse, dense = self.model.prompt_encoder(points=points, boxes=box_tensor, masks=None)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=self.embedding,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return {"low_res_logits": low_res.numpy(), "scores": iou.numpy(),
                "logits": self.postprocess(low_res).numpy()}

    def postprocess(self, low_res: torch.Tensor) -> torch.Tensor:
        """SAM's postprocess_masks: to the input size, crop the padding, to the original size."""
        size = self.pre.image_size
        masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        if self.pre.resize == "longest_side":
            masks = masks[..., : self.frame.resized_hw[0], : self.frame.resized_hw[1]]
        return F.interpolate(masks, self.frame.original_hw, mode="bilinear", align_corners=False)
