"""Mask PNGs and overlay images for people to look at, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from samedge.errors import PromptError, UsageError

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.float32)


def _save_png(array: np.ndarray, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def label_dtype(count: int) -> type:
    """The smallest PNG-writable integer type that holds labels 0..count."""
    if count > np.iinfo(np.uint16).max:
        raise PromptError(f"{count} masks cannot be labelled in one PNG (16-bit: at most 65535)",
                          hint="split the prompts over several predict calls")
    return np.uint8 if count <= np.iinfo(np.uint8).max else np.uint16


def label_map(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool → (H, W) labels 1..K (later masks win where they overlap); uint8 up to
    255 masks, uint16 beyond."""
    labels = np.zeros(masks.shape[1:], label_dtype(len(masks)))
    for index, mask in enumerate(masks, start=1):
        labels[mask] = index
    return labels


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend coloured labels over an (H, W, 3) uint8 image (one pass, whatever the label count)."""
    out = image.astype(np.float32)
    where = labels > 0
    colours = PALETTE[(labels[where].astype(np.int64) - 1) % len(PALETTE)]
    out[where] = (1 - alpha) * out[where] + alpha * colours
    return np.clip(out, 0, 255).astype(np.uint8)


def output_paths(prefix: Path) -> list[Path]:
    """The files ``save_mask_outputs`` / ``save_label_outputs`` write for a prefix."""
    prefix = Path(prefix)
    return [prefix.with_name(prefix.name + ".png"),
            prefix.with_name(prefix.name + "_overlay.png")]


def refuse_overwriting(outputs: list[Path], inputs: list[Path]) -> None:
    """Raise UsageError when an output would replace an input file (or lie inside an input
    folder, e.g. a DICOM series that would then hold a PNG)."""
    for out in outputs:
        target = Path(out).resolve()
        for source in inputs:
            source = Path(source).resolve()
            if target == source or (source.is_dir() and target.is_relative_to(source)):
                raise UsageError(
                    f"output {out} would overwrite or land inside the input {source}",
                    hint="choose another -o/--out prefix")


def save_mask_outputs(image: np.ndarray, masks: np.ndarray, prefix: Path) -> list[Path]:
    """Write PREFIX.png (0/255 for one mask, labels 1..K for several) and PREFIX_overlay.png."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    labels = label_map(masks.astype(bool, copy=False))
    mask_png = labels * 255 if masks.shape[0] == 1 else labels
    mask_path, overlay_path = output_paths(prefix)
    return [_save_png(mask_png, mask_path), _save_png(overlay(image, labels), overlay_path)]


def save_label_outputs(image: np.ndarray, labels: np.ndarray, prefix: Path) -> list[Path]:
    """A semantic family's label map: PREFIX.png holds the class index of every pixel (0 =
    background; 8-bit, 16-bit beyond 255 classes), PREFIX_overlay.png the classes in colour."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"label map {labels.shape} does not match the image {image.shape[:2]}")
    labels = labels.astype(label_dtype(int(labels.max(initial=0))), copy=False)
    mask_path, overlay_path = output_paths(prefix)
    return [_save_png(labels, mask_path), _save_png(overlay(image, labels), overlay_path)]
