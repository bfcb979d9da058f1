"""Prompts as the decoder graph takes them, built one way for the runtime and for calibration.

Calibration feeds the decoder the prompts a user gives through ``Predictor.predict``; building
both from this one function keeps INT8 ranges measured on exactly the runtime's inputs.
"""

from __future__ import annotations

import numpy as np

from samedge.errors import PromptError
from samedge.runtime.transforms import (
    ImageFrame,
    Preprocessing,
    check_boxes,
    check_points,
    resized_shape,
    transform_boxes,
    transform_points,
)

BOX_LABELS = np.float32([2, 3])  # SAM's labels of a box's top-left and bottom-right corners
PAD_LABEL = -1.0  # SAM's padding point, appended when no box closes the prompt


def sparse_prompt(point_coords, point_labels, boxes, frame: ImageFrame, pre: Preprocessing,
                  mask_count: int | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """SAM's sparse prompt in the model frame: points, then box corners (labels 2, 3), or a pad
    point; returns (coords (B, N, 2), labels (B, N), whether the caller gave a batch).

    Without a box SAM appends one padding point (label -1); a mask-only prompt is that pad.
    """
    if point_coords is None and point_labels is not None:
        raise PromptError("point_labels given without point_coords")
    parts_xy, parts_label, batched = [], [], False
    count = mask_count if point_coords is None and boxes is None else None
    if point_coords is not None:
        if point_labels is None:
            raise PromptError("point_coords need point_labels (1 foreground, 0 background)")
        batched = np.ndim(point_coords) == 3
        points, labels = check_points(point_coords, point_labels, frame, pre)
        parts_xy.append(transform_points(points, frame, pre))
        parts_label.append(labels)
        count = points.shape[0]
    if boxes is not None:
        array = check_boxes(boxes, frame)
        batched = batched or np.ndim(boxes) == 2
        if count not in (None, 1, array.shape[0]):
            raise PromptError(
                f"{count} point prompts cannot pair with {array.shape[0]} boxes",
                hint="give one point set per box, or one shared point set",
            )
        count = array.shape[0]
        parts_xy = [np.broadcast_to(p, (count, *p.shape[1:])) for p in parts_xy]
        parts_label = [np.broadcast_to(p, (count, *p.shape[1:])) for p in parts_label]
        parts_xy.append(transform_boxes(array, frame, pre))
        parts_label.append(np.broadcast_to(BOX_LABELS, (count, 2)))
    else:
        parts_xy.append(np.zeros((count, 1, 2), np.float32))
        parts_label.append(np.full((count, 1), PAD_LABEL, np.float32))
    coords = np.ascontiguousarray(np.concatenate(parts_xy, axis=1), dtype=np.float32)
    labels = np.ascontiguousarray(np.concatenate(parts_label, axis=1), dtype=np.float32)
    return coords, labels, batched


def frame_for(image_hw: tuple[int, int], pre: Preprocessing) -> ImageFrame:
    """The frame ``set_image`` will compute for an image of this size (no encoder call)."""
    height, width = int(image_hw[0]), int(image_hw[1])
    return ImageFrame((height, width), resized_shape(height, width, pre), pre.image_size)


def check_prompts(pre: Preprocessing, image_hw: tuple[int, int], point_coords=None,
                  point_labels=None, boxes=None, mask_input=None) -> None:
    """Validate prompts against an image size before anything is encoded: the same checks
    ``predict`` makes, so a bad prompt costs no encoder run (the CLI calls this first)."""
    checked_prompt(pre, frame_for(image_hw, pre), point_coords, point_labels, boxes, mask_input)


def checked_prompt(pre: Preprocessing, frame: ImageFrame, point_coords, point_labels, boxes,
                   mask_input):
    """Checked decoder inputs: (coords (B, N, 2), labels (B, N), batched, mask (1|B, 1, m, m),
    has_mask (B,)). Points come first, then box corners (labels 2, 3); without a box SAM appends
    one padding point (label -1), and a mask-only prompt is that pad."""
    if point_coords is None and boxes is None and mask_input is None:
        raise PromptError(
            "empty prompt: give point_coords/point_labels, boxes or mask_input",
            hint="for prompt-free segmentation use a semantic family (SAMed, MA-SAM)",
        )
    mask_count = np.shape(mask_input)[0] if np.ndim(mask_input) == 4 else 1
    coords, labels, batched = sparse_prompt(point_coords, point_labels, boxes, frame, pre,
                                            mask_count)
    mask, has_mask = _mask_prompt(pre, mask_input, coords.shape[0])
    if not has_mask.any():
        empty = (labels < 0).all(axis=1)
        if empty.any():
            raise PromptError(
                f"prompt {int(np.argmax(empty))} has only padding points (label -1): it "
                "points at nothing", hint="label clicks 1 (foreground) or 0 (background)")
    return coords, labels, batched, mask, has_mask


def _mask_prompt(pre, mask_input, count):
    """(mask (1 or B, 1, m, m), has_mask (B,)): one shared mask is broadcast chunk by chunk."""
    size = pre.mask_size
    if mask_input is None:
        return np.zeros((1, 1, size, size), np.float32), np.zeros(count, np.float32)
    mask = np.asarray(mask_input, dtype=np.float32)
    if mask.ndim == 3:
        mask = mask[None]
    if mask.shape[1:] != (1, size, size) or mask.shape[0] not in (1, count):
        raise PromptError(
            f"mask_input must be (1, {size}, {size}) or (B, 1, {size}, {size}); got "
            f"{np.shape(mask_input)}",
            hint="pass low_res_logits of a previous prediction",
        )
    if not np.isfinite(mask).all():
        raise PromptError("mask_input contains NaN or Inf")
    return mask, np.ones(count, np.float32)
