"""Intensity handling in one place: every source turns raw pixels into uint8 RGB through here.

SAM-family encoders were trained on 8-bit RGB images, and the medical adaptations on CT slices
windowed in Hounsfield units and MR slices scaled between the 0.5th and 99.5th percentile (MedSAM's
preprocessing). Calibration data that is mapped any other way shifts the activation ranges an int8
quantizer measures, so readers never scale pixels themselves.
"""

from __future__ import annotations

import math

import numpy as np

from samedge.errors import ImageError
from samedge.runtime.transforms import (
    apply_window,  # one definition: the runtime windows raw HU too
)

# Radiological (level, width) presets in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
    "liver": (60.0, 160.0),
}
DEFAULT_CT_WINDOW = "abdomen"
PERCENTILES = (0.5, 99.5)

Window = str | tuple[float, float]


def parse_window(spec: Window | None) -> tuple[float, float] | None:
    """Turn a preset name, an ``"L,W"`` string or a ``(level, width)`` pair into ``(level, width)``.

    ``None`` or an empty string means "no explicit window" and returns ``None`` so that the caller
    falls back to the modality's default.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str) and spec.strip().lower() in CT_WINDOWS:
        return CT_WINDOWS[spec.strip().lower()]
    try:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        level, width = (float(part) for part in parts)
    except (TypeError, ValueError):
        level, width = math.nan, math.nan
    if not (math.isfinite(level) and math.isfinite(width) and width > 0):
        raise ImageError(
            f"cannot parse intensity window {spec!r}",
            hint=f"use one of {', '.join(CT_WINDOWS)} or 'level,width' in HU, width > 0: '40,400'",
        )
    return level, width


def to_uint8(array: np.ndarray, modality: str, window: Window | None = None) -> np.ndarray:
    """Map a 2-D (H, W) or colour (H, W, 3|4) array to a display-ready uint8 (H, W, 3) image.

    Grayscale: an explicit ``window`` is applied to any modality; CT without one gets the abdomen
    window (the array must already be in HU); 8-bit data of other modalities is already
    display-ready and kept; anything else is percentile-scaled. Colour: uint8 is kept as is (alpha
    dropped), deeper colour is percentile-scaled over all channels so hues are preserved.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.size == 0 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(
            f"expected a 2-D grayscale or (H, W, 3) colour image, got shape {a.shape}",
            hint="pass a single slice; pick one slice of a volume with slice_index",
        )
    if not np.issubdtype(a.dtype, np.number):
        raise ImageError(f"image has non-numeric dtype {a.dtype}", hint="store numeric pixels")
    if not np.isfinite(a).all():
        raise ImageError(
            "image contains NaN or Inf values",
            hint="fill or mask invalid voxels (e.g. np.nan_to_num) before passing the image",
        )
    if a.ndim == 3:
        rgb = a[..., :3]
        return rgb if rgb.dtype == np.uint8 else percentile_scale(rgb)
    level_width = parse_window(window)
    if level_width is None and modality.upper() == "CT":
        level_width = CT_WINDOWS[DEFAULT_CT_WINDOW]
    if level_width is not None:
        gray = apply_window(a, *level_width)
    elif a.dtype == np.uint8:
        gray = a
    else:
        gray = percentile_scale(a)
    return np.repeat(gray[..., None], 3, axis=-1)


def percentile_scale(values: np.ndarray) -> np.ndarray:
    """Scale the 0.5..99.5 percentiles of the non-zero pixels to 0..255 (MedSAM's MR convention).

    Zeros are left out of the percentiles so a large black background does not pull the lower bound
    down; blank or constant images map to zeros instead of dividing by zero.
    """
    a = values.astype(np.float64)
    foreground = a[a != 0]
    if foreground.size == 0:
        return np.zeros(a.shape, np.uint8)
    low, high = np.percentile(foreground, PERCENTILES)
    if high <= low:
        return np.zeros(a.shape, np.uint8)
    scaled = (np.clip(a, low, high) - low) * 255.0 / (high - low)
    return np.rint(scaled).astype(np.uint8)


def normalize_window(window: Window | None) -> Window | None:
    """Accept ``ct-abdomen``-style names as well as ``abdomen`` and ``L,W``."""
    if isinstance(window, str) and window.lower().startswith("ct-"):
        window = window[3:]
    parse_window(window)
    return window
