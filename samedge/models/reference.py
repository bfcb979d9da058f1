"""The FP32 PyTorch reference every exported graph and engine is judged against.

It shares the runtime's preprocessing (one definition, so drift measures the engine and not a
second resizer) but decodes through the upstream modules' own API — ``prompt_encoder(points=,
boxes=, masks=)`` and ``mask_decoder(..., multimask_output)`` — and upsamples with
``F.interpolate`` as SAM's ``postprocess_masks`` does, independently of the export wrappers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samedge.models.card import ModelCard
from samedge.runtime.transforms import (
    ImageFrame,
    preprocess,
    transform_boxes,
    transform_points,
)


class TorchReference:
    def __init__(self, card: ModelCard):
        self.card = card
        self.model = card.model.eval()
        self.pre = card.preprocessing
        self.embedding: torch.Tensor | None = None
        self.frame: ImageFrame | None = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> torch.Tensor:
        tensor, self.frame = preprocess(image, self.pre)
        self.embedding = self.model.image_encoder(torch.from_numpy(tensor))
        return self.embedding

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
