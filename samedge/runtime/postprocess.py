"""Decoder logits → masks or label maps at the original size, as each family's upstream script.

What is resized matters as much as how: MedSAM resizes sigmoid probabilities straight from the
low-res map to the image and thresholds at 0.5; SAM and LiteMedSAM resize logits through the input
frame; SAMed takes the argmax at its input size and resizes the labels (nearest); MA-SAM resizes
softmax probabilities with a cubic spline. ``Preprocessing.mask_*`` records which (see
docs/preprocessing.md); every step here runs in numpy (scipy.ndimage for the spline zooms).
"""

from __future__ import annotations

import numpy as np

from samedge.runtime.transforms import (
    ImageFrame,
    Preprocessing,
    one_blas_thread,
    resize_matrix,
    upscale_logits,
)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return (shifted / shifted.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


def _bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(x, out_hw, mode="bilinear", align_corners=False)`` on (..., h, w)."""
    wy = resize_matrix(x.shape[-2], out_hw[0]).astype(np.float32)
    wx = resize_matrix(x.shape[-1], out_hw[1]).astype(np.float32)
    with one_blas_thread():
        return np.matmul(np.matmul(wy, x), wx.T)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's ``nearest`` source index: ``min(floor(i * (n_in / n_out)), n_in - 1)``, with the
    scale and product in float32 as its CPU kernel computes them."""
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1)


def _zoom(x: np.ndarray, out_hw: tuple[int, int], order: int, spatial: tuple[int, int]) -> np.ndarray:
    """``scipy.ndimage.zoom`` with factor ``out / in`` on the two ``spatial`` axes and 1 on the
    rest, as SAMed (labels, order 0) and MA-SAM (probabilities, order 3) call it."""
    from scipy import ndimage

    factors = [1.0] * x.ndim
    for axis, size in zip(spatial, out_hw):
        factors[axis] = size / x.shape[axis]
    return ndimage.zoom(x, factors, order=order)


def _to_input_frame(low_res: np.ndarray, frame: ImageFrame, pre: Preprocessing) -> np.ndarray:
    """SAM's postprocess_masks up to the crop: bilinear to the input size, padding removed."""
    size = frame.input_size
    full = _bilinear(low_res.astype(np.float32, copy=False), (size, size))
    if pre.resize == "longest_side":
        full = full[..., : frame.resized_hw[0], : frame.resized_hw[1]]
    return full


def _final_resize(x: np.ndarray, out_hw: tuple[int, int], method: str) -> np.ndarray:
    """Resize (N, K, h, w) scores to ``out_hw`` with the family's last resize."""
    if x.shape[-2:] == tuple(out_hw):
        return x
    if method == "bilinear":
        return _bilinear(x, out_hw)
    if method == "nearest":
        rows, cols = _nearest_index(x.shape[-2], out_hw[0]), _nearest_index(x.shape[-1], out_hw[1])
        return x[..., rows[:, None], cols[None, :]]
    order = 0 if method == "spline0" else 3
    return _zoom(x, out_hw, order, spatial=(x.ndim - 2, x.ndim - 1))


def mask_scores(low_res: np.ndarray, frame: ImageFrame, pre: Preprocessing) -> np.ndarray:
    """(B, K, m, m) low-res logits → (B, K, H, W) scores at the original size: logits, or sigmoid
    probabilities where the family resizes those; masks are scores > ``pre.mask_threshold``."""
    low = low_res.astype(np.float32, copy=False)
    if pre.mask_path == "sam" and pre.mask_resize == "logits" and pre.mask_interpolation == "bilinear":
        return upscale_logits(low, frame, pre)  # the banded fast path
    scores = _to_input_frame(low, frame, pre) if pre.mask_path == "sam" else low
    if pre.mask_resize == "probabilities":
        scores = sigmoid(scores)
    return np.ascontiguousarray(_final_resize(scores, frame.original_hw, pre.mask_interpolation),
                                dtype=np.float32)


def prompt_masks(scores: np.ndarray, pre: Preprocessing) -> np.ndarray:
    return scores > pre.mask_threshold


def semantic_maps(low_res: np.ndarray, frame: ImageFrame,
                  pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(N, K+1, m, m) class logits → (scores (N, K+1, H, W), labels (N, H, W)) at the original
    size. ``labels`` (SAMed): argmax of the softmax at the input size, then the label map zoomed
    with order 0, scores the logits zoomed alike. ``probabilities`` (MA-SAM): softmax at the input
    size zoomed with order 3 as one (N, h, w, K+1) array, then argmax. ``logits``: resized, argmax.
    """
    low = low_res.astype(np.float32, copy=False)
    if pre.mask_resize == "logits":
        scores = mask_scores(low, frame, pre)
        return scores, scores.argmax(axis=1)
    if pre.mask_resize == "probabilities":
        return probability_maps(class_probabilities(low, frame, pre), frame, pre)
    at_input = _to_input_frame(low, frame, pre) if pre.mask_path == "sam" else low
    out_hw = frame.original_hw
    labels = softmax(at_input).argmax(axis=1)
    if labels.shape[-2:] != tuple(out_hw):
        labels = np.stack([_zoom(item, out_hw, 0, spatial=(0, 1)) for item in labels])
    return _final_resize(at_input, out_hw, pre.mask_interpolation), labels


def class_probabilities(low_res: np.ndarray, frame: ImageFrame, pre: Preprocessing) -> np.ndarray:
    """(N, K+1, m, m) class logits → their softmax at the input size, before the last resize:
    what MA-SAM averages over the windows that cover a slice."""
    low = low_res.astype(np.float32, copy=False)
    return softmax(_to_input_frame(low, frame, pre) if pre.mask_path == "sam" else low)


def probability_maps(probabilities: np.ndarray, frame: ImageFrame,
                     pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities at the input size → (probabilities, labels) at the original size,
    with the family's last resize (MA-SAM: one order-3 zoom of the (N, h, w, K+1) array)."""
    out_hw = frame.original_hw
    zoomed = probabilities.shape[-2:] != tuple(out_hw)
    if pre.mask_interpolation in ("spline0", "spline3") and zoomed:
        channels_last = np.moveaxis(probabilities, 1, -1)  # (N, h, w, K+1), as upstream zooms it
        order = 3 if pre.mask_interpolation == "spline3" else 0
        probabilities = np.moveaxis(_zoom(channels_last, out_hw, order, spatial=(1, 2)), -1, 1)
    else:
        probabilities = _final_resize(probabilities, out_hw, pre.mask_interpolation)
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
    return probabilities, probabilities.argmax(axis=1)
