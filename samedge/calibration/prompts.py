"""Prompts for validation and calibration when no annotation exists, and from masks when one does.

Unlabelled slices get boxes derived from the image itself: the bounding box of the foreground
(Otsu threshold on the grey levels, so air/background outside the body is excluded), and boxes
over its halves and centre — the sizes a clinician draws around organs and lesions. They are
deterministic, so drift figures are comparable between runs.
"""

from __future__ import annotations

import numpy as np

from samedge.errors import PromptError


def otsu_threshold(gray: np.ndarray) -> float:
    """Otsu's threshold of a uint8-range image (maximises between-class variance)."""
    hist = np.bincount(np.clip(gray, 0, 255).astype(np.int64).ravel(), minlength=256)
    prob = hist / max(hist.sum(), 1)
    omega = np.cumsum(prob)
    mu = np.cumsum(prob * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return float(np.nanargmax(np.nan_to_num(between, nan=-1.0)))


def foreground_box(image: np.ndarray) -> np.ndarray:
    """xyxy box around the above-Otsu pixels of an (H, W[, 3]) image; whole image if none."""
    gray = image.mean(axis=-1) if image.ndim == 3 else image
    ys, xs = np.nonzero(gray > otsu_threshold(gray))
    if ys.size == 0:
        return np.array([0, 0, gray.shape[1], gray.shape[0]], dtype=np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def auto_boxes(image: np.ndarray) -> np.ndarray:
    """(5, 4) boxes: the foreground box, its left/right/top halves and its central half."""
    x0, y0, x1, y1 = foreground_box(image)
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2
    return np.array([
        [x0, y0, x1, y1],
        [x0, y0, cx, y1],
        [cx, y0, x1, y1],
        [x0, y0, x1, cy],
        [cx - w / 4, cy - h / 4, cx + w / 4, cy + h / 4],
    ], dtype=np.float32)


def box_from_mask(mask: np.ndarray, jitter: float = 0.0, rng: np.random.Generator | None = None
                  ) -> np.ndarray:
    """Tight xyxy box of a binary mask, optionally enlarged/shifted by up to ``jitter`` × size
    per side (how box prompts are simulated in MedSAM-style evaluation)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise PromptError("mask is empty; no box can be derived from it")
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
    if jitter:
        rng = rng or np.random.default_rng(0)
        size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        box += rng.uniform(-jitter, jitter, 4) * size
        box = np.clip(box, 0, [mask.shape[1], mask.shape[0]] * 2)
    return box.astype(np.float32)


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """(B, 1, 2) centre points of (B, 4) boxes, for single-click prompts."""
    boxes = np.asarray(boxes, dtype=np.float32)
    return ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None, :]
