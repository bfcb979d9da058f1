"""The upstream projects' own resizers, bit for bit, with the arguments their scripts use.

What an 8-bit resizer rounds, or what a cubic spline prefilters, a float resampler can only
approximate. These functions reproduce it exactly: by calling the libraries the upstream scripts
call, Pillow (already a runtime dependency) and scipy.ndimage (which scikit-image's ``resize`` is
built on, so MedSAM's path runs without scikit-image), and, for OpenCV's ``INTER_AREA`` (no
OpenCV at the bedside), by repeating its arithmetic in numpy: float32 accumulation in its order
when shrinking, 11-bit fixed-point weights when enlarging, integer block sums on integer factors.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def pil_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Pillow's BILINEAR on uint8 (H, W, 3) — torchvision's ``Resize`` on a PIL image (Med-SA's
    2-D datasets) and SAM's ``ResizeLongestSide`` — returning uint8, rounded as Pillow rounds."""
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize(
        (out_hw[1], out_hw[0]), Image.BILINEAR)
    return np.asarray(resized)


def spline_zoom(image: np.ndarray, out_hw: tuple[int, int], order: int = 3) -> np.ndarray:
    """``scipy.ndimage.zoom(slice, (out_h / h, out_w / w), order=order)`` on a float32 slice, as
    SAMed's ``test_single_volume`` and MA-SAM's ``test.py`` call it (mode 'constant', no grid
    mode), channel by channel; identical channels (a grayscale slice) are zoomed once."""
    from scipy import ndimage

    height, width = image.shape[:2]
    factors = (out_hw[0] / height, out_hw[1] / width)
    planes = np.asarray(image, dtype=np.float32)
    if planes.ndim == 2:
        return ndimage.zoom(planes, factors, order=order)
    if (planes == planes[..., :1]).all():
        zoomed = ndimage.zoom(planes[..., 0], factors, order=order)
        return np.repeat(zoomed[..., None], planes.shape[-1], axis=-1)
    return np.stack([ndimage.zoom(planes[..., c], factors, order=order)
                     for c in range(planes.shape[-1])], axis=-1)


def skimage_resize(image: np.ndarray, out_hw: tuple[int, int], order: int = 3) -> np.ndarray:
    """``skimage.transform.resize(image, out_hw, order, preserve_range=True, anti_aliasing=True)``
    (MedSAM_Inference.py) on (H, W, C), float64 out, step by step as scikit-image 0.19–0.26 do it:
    a Gaussian with sigma ``max(0, (factor - 1) / 2)`` per axis (mirror boundary), a grid-mode
    spline zoom, then a clip to the input's range. The (H, W, C) array goes through whole, as
    upstream passes it: the truncation to uint8 that follows turns the last bit of flat regions
    (99.999… vs 100.0) into a grey level, so the float operations have to be the same ones."""
    from scipy import ndimage

    pixels = np.asarray(image)
    if pixels.dtype.char not in "df":  # preserve_range: integers become float64, floats stay
        pixels = pixels.astype(float)
    output_shape = (*out_hw, *pixels.shape[2:])
    factors = np.divide(pixels.shape, output_shape)
    sigma = np.maximum(0, (factors - 1) / 2)
    filtered = ndimage.gaussian_filter(pixels, sigma, cval=0, mode="mirror")
    out = ndimage.zoom(filtered, [1 / f for f in factors], order=order, mode="mirror", cval=0,
                       grid_mode=True)
    np.clip(out, pixels.min(), pixels.max(), out=out)
    return out


def opencv_area(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)`` on uint8 (H, W[, C]), bit for
    bit (LiteMedSAM's ``resize_longest_side``): OpenCV takes one of three paths by scale factor,
    each rounding its own way, and a 1/255 step moves LiteMedSAM's min-max input by more than
    float noise."""
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:  # the rounding reproduced here is OpenCV's for 8-bit images
        raise ValueError(f"INTER_AREA is reproduced for uint8 images; got {pixels.dtype}")
    (height, width), (out_h, out_w) = pixels.shape[:2], out_hw
    if (height, width) == (out_h, out_w):
        return pixels.copy()
    if out_h > height or out_w > width:
        return _area_enlarge(pixels, out_hw)
    if height % out_h == 0 and width % out_w == 0:
        return _area_blocks(pixels, out_hw)
    return _area_shrink(pixels, out_hw)


def _area_blocks(pixels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Integer factors (resizeAreaFast): integer block sums; 2×2 rounds halves up (its SIMD
    ``(sum + 2) >> 2``), other factors multiply by float32 ``1 / area`` and round to even."""
    (out_h, out_w), (fy, fx) = out_hw, (pixels.shape[0] // out_hw[0], pixels.shape[1] // out_hw[1])
    blocks = pixels.astype(np.int64).reshape(out_h, fy, out_w, fx, *pixels.shape[2:])
    sums = blocks.sum(axis=(1, 3))
    if fy == fx == 2:
        return ((sums + 2) >> 2).astype(np.uint8)
    scaled = sums.astype(np.float32) * np.float32(1.0 / (fy * fx))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@lru_cache(maxsize=64)
def _area_taps(n_in: int, n_out: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """OpenCV's ``computeResizeAreaTab`` for one axis, grouped by tap rank: group j holds the
    j-th (output, input, float32 weight) of every output that has one, so adding the groups in
    order repeats OpenCV's float32 accumulation order exactly."""
    scale = n_in / n_out
    taps: list[list[tuple[int, int, float]]] = []
    for out in range(n_out):
        start = out * scale
        stop = start + scale
        cell = min(scale, n_in - start)
        last = min(math.floor(stop), n_in - 1)
        first = min(math.ceil(start), last)
        row = []
        if first - start > 1e-3:
            row.append((first - 1, (first - start) / cell))
        row.extend((index, 1.0 / cell) for index in range(first, last))
        if stop - last > 1e-3:
            row.append((last, min(stop - last, 1.0, cell) / cell))
        taps.append(row)
    groups = []
    for rank in range(max(len(row) for row in taps)):
        rows = [(out, *row[rank]) for out, row in enumerate(taps) if len(row) > rank]
        outs, ins, weights = zip(*rows)
        groups.append((np.array(outs), np.array(ins), np.array(weights, dtype=np.float32)))
    return tuple(groups)


def _area_shrink(pixels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Non-integer shrinking (resizeArea): each source row is blended into output columns in
    float32, then the rows into output rows, in OpenCV's order, rounded to even."""
    trailing = (1,) * (pixels.ndim - 2)
    source = pixels.astype(np.float32)
    rows = np.zeros((pixels.shape[0], out_hw[1], *pixels.shape[2:]), np.float32)
    for outs, ins, weights in _area_taps(pixels.shape[1], out_hw[1]):
        rows[:, outs] += source[:, ins] * weights.reshape(1, -1, *trailing)
    out = np.zeros((*out_hw, *pixels.shape[2:]), np.float32)
    for outs, ins, weights in _area_taps(pixels.shape[0], out_hw[0]):
        out[outs] += rows[ins] * weights.reshape(-1, 1, *trailing)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@lru_cache(maxsize=64)
def _enlarge_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """INTER_AREA's enlarging taps (bilinear with area-style fractions) for one axis: left and
    right input index and their weights as OpenCV stores them,
    ``saturate_cast<short>(w · 2048)``."""
    inverse = n_out / n_in
    scale = 1.0 / inverse
    left = np.empty(n_out, np.int64)
    weights = np.empty((n_out, 2), np.int64)
    for out in range(n_out):
        index = math.floor(out * scale)
        frac = np.float32((out + 1) - (index + 1) * inverse)
        frac = np.float32(0.0) if frac <= 0 else np.float32(frac - math.floor(frac))
        if index >= n_in - 1:
            index, frac = n_in - 1, np.float32(0.0)
        left[out] = index
        weights[out] = np.rint(np.array([np.float32(1.0) - frac, frac], np.float32) * 2048)
    return left, np.minimum(left + 1, n_in - 1), weights


def _area_enlarge(pixels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Enlarging: OpenCV's fixed-point bilinear for uint8 — integer horizontal pass, then the
    vertical blend ``((b0·(r0 >> 4)) >> 16) + ((b1·(r1 >> 4)) >> 16) + 2 >> 2``."""
    trailing = (1,) * (pixels.ndim - 2)
    source = pixels.astype(np.int64)
    left, right, wx = _enlarge_taps(pixels.shape[1], out_hw[1])
    rows = (source[:, left] * wx[:, 0].reshape(1, -1, *trailing)
            + source[:, right] * wx[:, 1].reshape(1, -1, *trailing))
    top, bottom, wy = _enlarge_taps(pixels.shape[0], out_hw[0])
    b0, b1 = (wy[:, k].reshape(-1, 1, *trailing) for k in (0, 1))
    out = (((b0 * (rows[top] >> 4)) >> 16) + ((b1 * (rows[bottom] >> 4)) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)
