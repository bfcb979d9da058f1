"""Prompts for validation and calibration when no annotation exists, and from masks when one does.

Unlabelled slices get boxes derived from the image itself: the bounding box of the foreground
(Otsu threshold on the grey levels, so air/background outside the body is excluded), and boxes
over its halves and centre — the sizes a clinician draws around organs and lesions. They are
deterministic, so drift figures are comparable between runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samedge.data.slices import Slice
from samedge.errors import PromptError
from samedge.runtime.transforms import ImageFrame, check_boxes


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


@dataclass
class PromptSet:
    """The prompts one slice is decoded with: boxes, and for point-trained families single clicks
    at their centres. Box-only families (LiteMedSAM, MedSAM) never saw clicks in training; their
    click masks are a few unstable pixels, so clicks would measure noise, not drift."""

    boxes: np.ndarray
    clicks: np.ndarray | None = None

    @classmethod
    def auto(cls, image: np.ndarray, clicks: bool) -> "PromptSet":
        boxes = auto_boxes(image)
        return cls(boxes=boxes, clicks=box_centres(boxes) if clicks else None)

    def model_clicks(self, pre) -> np.ndarray:
        """The clicks (x, y) in the order the model reads them: Med-SA's legacy and 3D models
        take (row, col) (``Preprocessing.point_order`` "yx"), so each box's centre is swapped."""
        return self.clicks[..., ::-1].copy() if pre.point_order == "yx" else self.clicks


PROMPT_MODES = ("auto", "boxes-from-masks", "file")


@dataclass
class PromptPolicy:
    """How prompts are derived per slice, for validation and decoder calibration.

    ``auto``: boxes from the image itself (:func:`auto_boxes`: the Otsu foreground box, its halves
    and its centre — deterministic, so figures are comparable between runs); ``boxes-from-masks``:
    one box per label of the slice's mask (with optional ``jitter`` × size per side), or its stored
    box; ``file``: a JSON file ``{"slice name": [[x0, y0, x1, y1], ...]}``. ``clicks`` adds a
    centre click per box (for point-trained families). Boxes outside the image raise PromptError.
    """

    mode: str = "auto"
    jitter: float = 0.0
    clicks: bool = False
    prompts_file: Path | None = None
    seed: int = 0
    _file_boxes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in PROMPT_MODES:
            raise PromptError(f"unknown prompt mode {self.mode!r}", hint=f"use one of {PROMPT_MODES}")
        if self.mode == "file":
            if self.prompts_file is None:
                raise PromptError("prompt mode 'file' needs prompts_file")
            try:
                data = json.loads(Path(self.prompts_file).read_text())
            except (OSError, ValueError) as exc:
                raise PromptError(f"cannot read prompts file {self.prompts_file}: {exc}",
                                  hint='write {"slice name": [[x0, y0, x1, y1], ...]}') from exc
            if not isinstance(data, dict):
                raise PromptError(f"{self.prompts_file} must map slice names to box lists")
            self._file_boxes = data

    def boxes(self, item: Slice) -> np.ndarray:
        """(B, 4) xyxy boxes for one slice, validated against its size."""
        image = item.image
        if self.mode == "file":
            if item.name not in self._file_boxes:
                raise PromptError(f"prompts file has no boxes for slice {item.name!r}",
                                  hint="keys must be the slice names (see `samedge info`)")
            boxes = np.asarray(self._file_boxes[item.name], dtype=np.float32).reshape(-1, 4)
        elif self.mode == "boxes-from-masks":
            if item.box is not None:
                boxes = np.asarray(item.box, dtype=np.float32)[None]
            elif item.mask is not None and item.mask.any():
                rng = np.random.default_rng(self.seed)
                labels = [v for v in np.unique(item.mask) if v != 0]
                boxes = np.stack([box_from_mask(item.mask == v, self.jitter, rng)
                                  for v in labels])
            else:
                raise PromptError(
                    f"slice {item.name} has no mask or box to derive prompts from",
                    hint="pass labelled data (npz with mask/box) or use --prompts auto")
        else:
            boxes = auto_boxes(image)
        return check_boxes(boxes, ImageFrame(image.shape[:2], image.shape[:2])).astype(np.float32)

    def prompt_set(self, item: Slice) -> PromptSet:
        boxes = self.boxes(item)
        return PromptSet(boxes=boxes, clicks=box_centres(boxes) if self.clicks else None)
