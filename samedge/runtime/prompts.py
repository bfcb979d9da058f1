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
