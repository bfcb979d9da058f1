"""The upstream projects' own resizers, called with the arguments their inference scripts use.

The separable numpy resizers in :mod:`samedge.runtime.transforms` reproduce OpenCV's INTER_AREA
and plain bilinear in float; what an 8-bit resizer rounds, or what a cubic spline prefilters, they
can only approximate. These functions reproduce the rest exactly by calling the same libraries the
upstream scripts call: Pillow (already a runtime dependency) and scipy.ndimage (which
scikit-image's ``resize`` is built on, so MedSAM's path runs without scikit-image).
"""

from __future__ import annotations

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
