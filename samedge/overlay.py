"""Mask PNGs and overlay images for people to look at, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.float32)


def _save_png(array: np.ndarray, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def label_map(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool → (H, W) uint8 labels 1..K (later masks win where they overlap)."""
    labels = np.zeros(masks.shape[1:], np.uint8)
    for index, mask in enumerate(masks, start=1):
        labels[mask] = index
    return labels


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend coloured labels over an (H, W, 3) uint8 image."""
    out = image.astype(np.float32).copy()
    for value in range(1, int(labels.max()) + 1):
        where = labels == value
        out[where] = (1 - alpha) * out[where] + alpha * PALETTE[(value - 1) % len(PALETTE)]
    return np.clip(out, 0, 255).astype(np.uint8)


def save_mask_outputs(image: np.ndarray, masks: np.ndarray, prefix: Path) -> list[Path]:
    """Write PREFIX.png (0/255 for one mask, labels 1..K for several) and PREFIX_overlay.png."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    labels = label_map(masks.astype(bool))
    mask_png = labels * 255 if masks.shape[0] == 1 else labels
    return [
        _save_png(mask_png.astype(np.uint8), prefix.with_name(prefix.name + ".png")),
        _save_png(overlay(image, labels), prefix.with_name(prefix.name + "_overlay.png")),
    ]


def save_label_outputs(image: np.ndarray, labels: np.ndarray, prefix: Path) -> list[Path]:
    """A semantic family's label map: PREFIX.png holds the class index of every pixel (0 =
    background; 8-bit, 16-bit beyond 255 classes), PREFIX_overlay.png the classes in colour."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"label map {labels.shape} does not match the image {image.shape[:2]}")
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return [
        _save_png(labels.astype(dtype), prefix.with_name(prefix.name + ".png")),
        _save_png(overlay(image, labels), prefix.with_name(prefix.name + "_overlay.png")),
    ]
