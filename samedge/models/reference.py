"""The FP32 PyTorch reference every exported graph and engine is judged against.

It shares the runtime's preprocessing (one definition, so drift measures the engine and not a
second resizer) but decodes through the upstream modules' own API — ``prompt_encoder(points=,
boxes=, masks=)`` and ``mask_decoder(..., multimask_output)`` — and turns logits into masks or
label maps with torch and scipy as each family's inference script does, independently of the
runtime's numpy postprocessing and of the export wrappers.
Adaptation families are judged against their unmerged, upstream-faithful model (``card.reference``),
so drift covers the whole path from the checkpoint as its authors saved it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import zoom

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
    def set_image(self, image: np.ndarray, window=None) -> torch.Tensor:
        tensor, frame = preprocess(image, self.pre, window)
        self._encode(tensor, frame, 0)
        return self.embedding

    @torch.no_grad()
    def set_volume(self, stack, window=None) -> torch.Tensor:
        """D adjacent slices in one encoder call; ``predict`` then uses the centre slice."""
        tensor, frame = preprocess_stack(stack, self.pre, self.card.depth, window)
        self._encode(tensor, frame, self.card.depth // 2)
        return self.embeddings

    def _encode(self, tensor: np.ndarray, frame: ImageFrame, current: int) -> None:
        self.embeddings = self.model.image_encoder(torch.from_numpy(tensor))
        self.frame, self.slice = frame, current

    def select_slice(self, index: int) -> None:
        self.slice = index % len(self.embeddings)

    @torch.no_grad()
    def segment(self) -> dict[str, np.ndarray]:
        """Semantic families: class logits (N, K+1, m, m) and label maps at the original size, as
        the family's test script derives them (SAMed's ``test_single_volume``: argmax at the input
        size, order-0 zoom; MA-SAM's ``test.py``: softmax zoomed with order 3, argmax)."""
        low_res, _ = semantic_decode(self.model, self.embeddings)
        size, (height, width) = self.pre.image_size, self.frame.original_hw
        masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        if self.pre.mask_resize == "labels":
            out = torch.argmax(torch.softmax(masks, dim=1), dim=1).numpy()
            if (height, width) != out.shape[-2:]:
                out = np.stack([zoom(item, (height / item.shape[0], width / item.shape[1]),
                                     order=0) for item in out])
            labels = out
        elif self.pre.mask_resize == "probabilities":
            probabilities = torch.softmax(masks, dim=1).permute(0, 2, 3, 1).numpy()
            if (height, width) != probabilities.shape[1:3]:
                probabilities = zoom(probabilities, (1.0, height / size, width / size, 1.0),
                                     order=3)
            labels = np.argmax(probabilities, axis=-1)
        else:  # bundles recorded before the family's own postprocessing: logits, bilinear
            labels = self.postprocess(low_res).argmax(dim=1).numpy()
        return {"low_res_logits": low_res.numpy(), "labels": labels}

    @torch.no_grad()
    def predict(self, boxes=None, point_coords=None, point_labels=None,
                multimask_output: bool | None = None) -> dict[str, np.ndarray]:
        """Low-res logits (B, K, m, m), IoU scores (B, K) and, as ``logits``, the family's mask
        scores at the original size (masks are those > ``pre.mask_threshold``)."""
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
        """The family's mask scores at the original size, in torch as its script computes them:
        SAM's postprocess_masks (to the input size, crop the padding, to the original size) or
        one direct ``F.interpolate`` (MedSAM, Med-SA); sigmoid first where upstream resizes
        probabilities (MedSAM); bilinear, or nearest (Med-SA legacy)."""
        pre, masks = self.pre, low_res
        if pre.mask_path == "sam":
            size = pre.image_size
            masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
            if pre.resize == "longest_side":
                masks = masks[..., : self.frame.resized_hw[0], : self.frame.resized_hw[1]]
        if pre.mask_resize == "probabilities":
            masks = torch.sigmoid(masks)
        if pre.mask_interpolation == "nearest":
            return F.interpolate(masks, self.frame.original_hw)
        return F.interpolate(masks, self.frame.original_hw, mode="bilinear", align_corners=False)
