"""The image contract of ``set_image``: every dtype maps to one intensity scale before the model.

Each family's upstream pipeline starts from one kind of image: 8-bit pictures (LiteMedSAM, SAM,
MedSAM, Med-SA 2-D read PNG/JPEG or uint8 npz) or float intensities windowed from Hounsfield
units (SAMed, MA-SAM, Med-SA 3-D). Callers hand over uint8, uint16, floats or raw HU; this module
puts all of them on the 0..255 intensity scale by dtype — never by guessing from the values — so
the same slice gives the same encoder input whatever its dtype:

- ``uint8``: as is.
- ``uint16``: the full range, ``x * 255 / 65535`` (an 8-bit image stored as ``x * 257`` is itself).
- floats: the [0, 1] convention of scikit-image and torchvision, ``x * 255``; values outside
  [0, 1] are refused.
- anything, with ``window=``: raw values (CT in HU) clipped to ``[level - width/2, level +
  width/2]`` and stretched to 0..255; ``window="model"`` takes the family's training window.
- other dtypes (bool, complex, signed or wider integers without a window) and shapes other than
  (H, W), (H, W, 1), (H, W, 3) are typed errors.

8-bit families then round to uint8 (upstream read 8-bit files), float families keep the float.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from samedge.errors import ImageError

WindowArg = tuple[float, float] | Literal["model"] | None
HU_HINT = "CT in Hounsfield units: pass window='model' (the family's training window) or (level, width)"


def apply_window(hu: np.ndarray, level: float, width: float, rounded: bool = True) -> np.ndarray:
    """Clip to ``[level - width/2, level + width/2]`` and stretch linearly to 0..255: rounded to
    uint8 for display-ready sources, float64 for families whose pipeline windows in float."""
    low = level - width / 2.0
    scaled = (np.clip(np.asarray(hu, dtype=np.float64), low, low + width) - low) * 255.0 / width
    return np.rint(scaled).astype(np.uint8) if rounded else scaled


def resolve_window(window: WindowArg, ct_window: tuple[float, float] | None) -> tuple[float, float]:
    """``"model"`` → the family's recorded window; a (level, width) pair is checked."""
    if isinstance(window, str):
        if window != "model":
            raise ImageError(f"window must be 'model' or (level, width), not {window!r}")
        if ct_window is None:
            raise ImageError("this model records no CT window",
                             hint="pass window=(level, width) in HU, e.g. (40, 400) for abdomen")
        return ct_window
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        level, width = math.nan, math.nan
    if not (math.isfinite(level) and math.isfinite(width) and width > 0):
        raise ImageError(f"cannot use window {window!r}",
                         hint="give (level, width) in HU with width > 0, e.g. (40, 400)")
    return level, width


def _check_shape(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        hint = ("drop the alpha channel (image[..., :3])" if array.ndim == 3
                and array.shape[-1] == 4 else
                "pass one 2-D slice; for a volume use set_volume or pick a slice first")
        raise ImageError(f"image must be (H, W), (H, W, 1) or (H, W, 3); got shape {array.shape}",
                         hint=hint)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image is empty (shape {array.shape})")
    return array


def to_intensity(image, window: WindowArg = None, ct_window: tuple[float, float] | None = None,
                 rounded: bool = True) -> np.ndarray:
    """Any supported image → (H, W, 3) on the 0..255 scale: uint8 when ``rounded`` (8-bit
    families), else float64. See the module docstring for the contract."""
    try:
        array = np.asarray(image)
    except Exception as exc:  # ragged lists and the like
        raise ImageError(f"image is not an array: {exc}") from exc
    kind = array.dtype.kind
    if kind not in "uif":
        what = {"b": "a boolean array is a mask, not an image",
                "c": "complex values have no intensity"}.get(kind, f"dtype {array.dtype}")
        raise ImageError(f"image has unsupported dtype {array.dtype}: {what}",
                         hint="pass uint8, uint16 or float in [0, 1]; raw CT with window=")
    array = _check_shape(array)
    if kind == "f" and not np.isfinite(array).all():
        raise ImageError(
            "image contains NaN or Inf values",
            hint="replace missing values (e.g. np.nan_to_num) or window the data before segmenting",
        )
    if window is not None:
        scaled = apply_window(array, *resolve_window(window, ct_window), rounded=rounded)
    elif array.dtype == np.uint8:
        scaled = array
    elif array.dtype == np.uint16:
        scaled = array / 257.0  # 65535 → 255 exactly
    elif kind == "f":
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(
                f"float images are read as intensities in [0, 1]; this one spans "
                f"[{low:g}, {high:g}]",
                hint=f"{HU_HINT}; for 0..255 floats divide by 255 or cast to uint8",
            )
        scaled = array.astype(np.float64) * 255.0
    else:
        raise ImageError(f"{array.dtype} images have no implied intensity range",
                         hint=f"{HU_HINT}; otherwise convert to uint8, uint16 or float in [0, 1]")
    if rounded and scaled.dtype != np.uint8:
        scaled = np.rint(scaled).astype(np.uint8)
    elif not rounded:
        scaled = scaled.astype(np.float64, copy=False)
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[..., None], 3, axis=-1)
    return scaled
