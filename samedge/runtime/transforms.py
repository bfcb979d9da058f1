"""The one preprocessing definition: image → encoder tensor, prompts → model frame, logits → masks.

Calibration, drift validation and the runtime all call these functions, so an INT8 engine is
calibrated on exactly the tensors it will see at the bedside. Each family's steps are its upstream
inference script's, in its order (docs/preprocessing.md): the upstream resizers bit for bit
(:mod:`samedge.runtime.resamplers`: Pillow, scipy.ndimage, OpenCV's ``INTER_AREA`` in numpy), and
separable numpy weight matrices (``out = Wy @ img @ Wx.T``) for ``F.interpolate`` bilinear on
images and masks. No OpenCV, scikit-image or torch in the bedside process.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

from samedge.errors import ImageError, PromptError, StackDepthError
from samedge.runtime import resamplers
from samedge.runtime.intensity import WindowArg, apply_window, to_intensity

Interpolation = Literal["area", "bilinear", "pil_bilinear", "spline3", "skimage_cubic"]
MaskInterpolation = Literal["bilinear", "nearest", "spline0", "spline3"]


@dataclass(frozen=True)
class Preprocessing:
    """A family's contract around its graphs, recorded verbatim in the manifest: how an image
    becomes the encoder input, and how decoder logits become masks, each as its upstream
    inference script does it (docs/preprocessing.md names the script per family).

    ``source``: what upstream's pipeline starts from — ``uint8`` images (every input is rounded to
    uint8 first, see :mod:`samedge.runtime.intensity`) or ``float`` intensities (windowed HU,
    never rounded: SAMed, MA-SAM, Med-SA 3D).
    ``resize``: ``longest_side`` keeps the aspect and zero-pads bottom/right (SAM, LiteMedSAM);
    ``stretch`` resizes to the square input. ``resize_via``: a first square size to resize to
    before ``image_size`` (SAMed's ``input_size`` 224), skipped where the image already has it.
    ``interpolation``: ``area`` = OpenCV INTER_AREA on uint8 (LiteMedSAM), ``pil_bilinear`` =
    Pillow BILINEAR on uint8 (SAM's ResizeLongestSide, torchvision's Resize on a PIL image:
    Med-SA 2-D, SAM-Adapter), ``bilinear`` = ``F.interpolate`` bilinear,
    ``spline3`` = ``scipy.ndimage.zoom`` order 3 (SAMed, MA-SAM), ``skimage_cubic`` =
    ``skimage.transform.resize`` order 3 with anti-aliasing (MedSAM; it resamples even at the
    input size, as upstream does).
    ``round_resized``: the resized image is cast back to uint8 as upstream's resizer returns it,
    by ``resized_cast``: ``round`` (OpenCV, Pillow) or ``truncate`` (numpy ``astype`` after
    scikit-image, MedSAM).
    ``normalize``: ``minmax`` maps to [0, 1] (LiteMedSAM, MedSAM); ``mean_std`` subtracts
    ``pixel_mean`` and divides by ``pixel_std`` in the 0–255 scale (SAM); ``unit`` divides by 255;
    ``standardize_minmax`` standardises with the dataset's ``pixel_mean``/``pixel_std`` and then
    min-maxes with MA-SAM's ``+ 1e-8`` (MA-SAM). ``normalize_stage``: before or after the resize;
    ``minmax_scope``: per ``image`` or over the whole ``stack`` of a depth model (MA-SAM).
    ``box_rounding``: ``floor`` truncates box coordinates after scaling (LiteMedSAM's ``int()``).
    ``point_order``: ``yx`` for Med-SA's legacy (row, col) clicks.
    ``ct_window``: the (level, width) in HU a family was trained on (SAMed, MA-SAM, Med-SA 3D),
    used by ``window="model"`` and the CLI; ``None`` = the source's default.
    Masks: ``mask_path`` ``sam`` goes low-res → input size (bilinear) → crop → original size
    (SAM's postprocess_masks), ``direct`` low-res → original size in one resize; the last resize
    acts on ``mask_resize`` — ``logits``, ``probabilities`` (sigmoid, or softmax over classes) or
    ``labels`` (argmax first) — with ``mask_interpolation`` (``F.interpolate`` bilinear or
    nearest, ``scipy.ndimage.zoom`` order 0 or 3); prompt masks are scores > ``mask_threshold``.
    """

    image_size: int
    resize: Literal["longest_side", "stretch"] = "longest_side"
    interpolation: Interpolation = "area"
    normalize: Literal["minmax", "mean_std", "unit", "standardize_minmax"] = "minmax"
    pixel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    round_resized: bool = True
    box_rounding: Literal["none", "floor"] = "none"
    point_order: Literal["xy", "yx"] = "xy"
    mask_size: int = 256
    ct_window: tuple[float, float] | None = None
    source: Literal["uint8", "float"] = "uint8"
    resize_via: int | None = None
    resized_cast: Literal["round", "truncate"] = "round"
    normalize_stage: Literal["before_resize", "after_resize"] = "after_resize"
    minmax_scope: Literal["image", "stack"] = "image"
    mask_path: Literal["sam", "direct"] = "sam"
    mask_resize: Literal["logits", "probabilities", "labels"] = "logits"
    mask_interpolation: MaskInterpolation = "bilinear"
    mask_threshold: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        """Read a manifest's record; one written before ``source`` existed gets the source its
        pipeline implied (float where the resize was not rounded)."""
        data = dict(data)
        for key in ("pixel_mean", "pixel_std", "ct_window"):
            if data.get(key) is not None:
                data[key] = tuple(float(v) for v in data[key])
        if "source" not in data:
            data["source"] = "uint8" if data.get("round_resized", True) else "float"
        if data.get("interpolation") == "triangle_aa":  # SAM-Adapter's float approximation of
            data["interpolation"] = "pil_bilinear"  # the Pillow resize it now calls (≤ 1 level)
        return cls(**data)


@dataclass(frozen=True)
class ImageFrame:
    """Where an original image sits inside the square model input."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    input_size: int = field(default=0)


def resized_shape(height: int, width: int, pre: Preprocessing) -> tuple[int, int]:
    """Size of the image inside the model input; SAM rounds with ``int(x + 0.5)``."""
    if pre.resize == "stretch":
        return pre.image_size, pre.image_size
    scale = pre.image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights so that ``W @ signal`` resamples one axis the way
    ``F.interpolate(mode="bilinear", align_corners=False)`` does: half-pixel centres, clamped."""
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        pos = max((i + 0.5) * scale - 0.5, 0.0)
        left = min(int(math.floor(pos)), n_in - 1)
        frac = pos - left
        if left >= n_in - 1:
            left, frac = n_in - 1, 0.0
        weights[i, left] += 1.0 - frac
        if frac:
            weights[i, left + 1] += frac
    return weights


@lru_cache(maxsize=1)
def _blas_pools():
    """numpy's BLAS thread pools (threadpoolctl), found once."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def one_blas_thread():
    """Run numpy's small matrix products on one thread: OpenBLAS's workers busy-wait after a
    call and slow the engine call that follows on the same cores (docs/performance.md)."""
    return _blas_pools().limit(limits=1)


def resize(image: np.ndarray, out_hw: tuple[int, int], method: Interpolation) -> np.ndarray:
    """Resample an (H, W) or (H, W, C) array to ``out_hw`` with ``method`` (see Preprocessing):
    the upstream resizers bit for bit, or ``F.interpolate`` bilinear as separable weights."""
    if method == "area":
        return resamplers.opencv_area(image, out_hw)
    if method == "pil_bilinear":
        return resamplers.pil_bilinear(image, out_hw)
    if method == "spline3":
        return resamplers.spline_zoom(image, out_hw, order=3)
    if method == "skimage_cubic":
        return resamplers.skimage_resize(image, out_hw, order=3)
    if method != "bilinear":
        raise ValueError(f"unknown interpolation {method!r}")
    wy = resize_matrix(image.shape[0], out_hw[0]).astype(np.float32)
    wx = resize_matrix(image.shape[1], out_hw[1]).astype(np.float32)
    with one_blas_thread():
        rows = np.tensordot(wy, np.asarray(image, np.float32), axes=(1, 0))  # (h, W, ...)
        return np.moveaxis(np.tensordot(wx, rows, axes=(1, 1)), 0, 1)


def _resize_steps(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The family's resize path: through ``resize_via`` first where it has one, each step only
    where the size differs (scikit-image's resize always resamples), each cast back to uint8 where
    the upstream resizer returns uint8."""
    targets = [resized_shape(*pixels.shape[:2], pre)]
    if pre.resize_via:
        targets.insert(0, (pre.resize_via, pre.resize_via))
    for target in targets:
        if pixels.shape[:2] == target and pre.interpolation != "skimage_cubic":
            continue
        pixels = resize(pixels, target, pre.interpolation)
        if pre.round_resized and pixels.dtype != np.uint8:
            cast = pixels if pre.resized_cast == "truncate" else np.rint(pixels)
            pixels = np.clip(cast, 0, 255).astype(np.uint8)
    return pixels


def _normalize(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """One normalisation over ``pixels`` (an image, or a stack when the scope is the stack)."""
    if pre.normalize == "minmax":
        pixels = np.asarray(pixels, np.float64)
        lo, hi = float(pixels.min()), float(pixels.max())
        return (pixels - lo) / max(hi - lo, 1e-8)
    if pre.normalize == "standardize_minmax":  # MA-SAM: float32, (x - mean) / std, then + 1e-8
        pixels = np.asarray(pixels, np.float32)
        pixels = (pixels - np.float32(pre.pixel_mean[0])) / np.float32(pre.pixel_std[0])
        return (pixels - pixels.min()) / (pixels.max() - pixels.min() + np.float32(1e-8))
    if pre.normalize == "mean_std":
        return (np.asarray(pixels, np.float64) - np.asarray(pre.pixel_mean)) / np.asarray(
            pre.pixel_std)
    return np.asarray(pixels, np.float64) / 255.0


def _normalize_all(images: list[np.ndarray], pre: Preprocessing) -> list[np.ndarray]:
    if pre.minmax_scope == "stack" and len(images) > 1:
        return list(_normalize(np.stack(images), pre))
    return [_normalize(image, pre) for image in images]


def _encoder_input(images: list[np.ndarray], pre: Preprocessing) -> np.ndarray:
    """Source images on the 0..255 scale (one frame) → (D, 3, S, S) float32, in upstream's order."""
    if pre.normalize_stage == "before_resize":
        images = _normalize_all(images, pre)
    images = [_resize_steps(image, pre) for image in images]
    if pre.normalize_stage == "after_resize":
        images = _normalize_all(images, pre)
    height, width = images[0].shape[:2]
    tensor = np.zeros((len(images), 3, pre.image_size, pre.image_size), dtype=np.float32)
    for index, image in enumerate(images):
        tensor[index, :, :height, :width] = np.moveaxis(image, -1, 0)
    return tensor


def source_image(image, pre: Preprocessing, window: WindowArg = None) -> np.ndarray:
    """Validate an image and put it on the family's source scale (see
    :mod:`samedge.runtime.intensity`): uint8 (H, W, 3), or float64 for float-source families."""
    return to_intensity(image, window, pre.ct_window, rounded=pre.source == "uint8")


def preprocess(image: np.ndarray, pre: Preprocessing,
               window: WindowArg = None) -> tuple[np.ndarray, ImageFrame]:
    """Image (H, W[, 3]) of any supported dtype → encoder input (1, 3, S, S) float32.

    ``window``: the image holds raw CT values (HU) to window first — ``"model"`` for the family's
    training window, or (level, width)."""
    pixels = source_image(image, pre, window)
    height, width = pixels.shape[:2]
    frame = ImageFrame((height, width), resized_shape(height, width, pre), pre.image_size)
    return _encoder_input([pixels], pre), frame


def preprocess_stack(stack, pre: Preprocessing, depth: int,
                     window: WindowArg = None) -> tuple[np.ndarray, ImageFrame]:
    """``depth`` adjacent slices (a list of images, or a (D, H, W[, 3]) array) → (D, 3, S, S).

    Depth models fix D in their encoder graph (Med-SA's regroup and MA-SAM's Conv3d bake it), so
    a stack of any other length is refused here rather than failing inside the engine. All slices
    must share one size (one frame for the stack); MA-SAM normalises over the stack as a whole.
    """
    if isinstance(stack, np.ndarray) and stack.ndim not in (3, 4):
        raise StackDepthError(
            f"a stack is D images (a list, or a (D, H, W[, 3]) array); got shape {stack.shape}",
            hint="for one 2-D image use set_image",
        )
    slices = list(stack)
    if len(slices) != depth:
        raise StackDepthError(
            f"this model's encoder takes a stack of {depth} adjacent slices; got {len(slices)}",
            hint=f"pass the {depth} slices around the slice of interest, edges replicated "
                 f"(Volume.stack(index, {depth}))" if depth > 1 else "use set_image",
        )
    sources = [source_image(image, pre, window) for image in slices]
    sizes = sorted({image.shape[:2] for image in sources})
    if len(sizes) > 1:
        raise ImageError(f"the slices of a stack must share one size; got {sizes}",
                         hint="pass adjacent slices of one volume")
    height, width = sizes[0]
    frame = ImageFrame((height, width), resized_shape(height, width, pre), pre.image_size)
    return _encoder_input(sources, pre), frame


def window_ct(hu: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Raw CT in Hounsfield units → the uint8 (H, W) image a CT-trained family expects, with the
    window it recorded (``pre.ct_window``: SAMed [-125, 275], MA-SAM [-200, 250] HU). Passing the
    HU itself with ``window="model"`` keeps the precision the uint8 rounding drops."""
    if pre.ct_window is None:
        raise ImageError("this model records no CT window",
                         hint="pass display-ready images, or window the data yourself")
    values = np.asarray(hu)
    if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
        raise ImageError("CT values must be finite numbers in HU")
    return apply_window(values, *pre.ct_window)


def _scale(frame: ImageFrame) -> np.ndarray:
    (h, w), (nh, nw) = frame.original_hw, frame.resized_hw
    return np.array([nw / w, nh / h], dtype=np.float64)


def transform_points(coords: np.ndarray, frame: ImageFrame, pre: Preprocessing) -> np.ndarray:
    """(..., 2) points in original pixels, in the family's order → the prompt encoder's (x, y).

    ``yx`` points (Med-SA's ``np.argwhere`` clicks, (row, col)) are scaled per axis and handed
    over in that order, as Med-SA hands them to a prompt encoder that reads (x, y): its models
    were trained on that transposed encoding, so reproducing it is what reproduces their masks.
    """
    scale = _scale(frame)
    if pre.point_order == "yx":
        scale = scale[::-1]
    return (np.asarray(coords, dtype=np.float64) * scale).astype(np.float32)


def transform_boxes(boxes: np.ndarray, frame: ImageFrame, pre: Preprocessing) -> np.ndarray:
    """(B, 4) xyxy boxes in original pixels → (B, 2, 2) corner points in the model frame."""
    corners = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2) * _scale(frame)
    if pre.box_rounding == "floor":
        corners = np.floor(corners)
    return corners.astype(np.float32)


def check_boxes(boxes: np.ndarray, frame: ImageFrame) -> np.ndarray:
    """Reject boxes that are malformed, inverted or reach outside the image."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[-1] != 4 or array.shape[0] == 0:
        raise PromptError(f"boxes must be (4,) or (B, 4) xyxy; got shape {np.shape(boxes)}")
    if not np.isfinite(array).all():
        raise PromptError("boxes contain NaN or Inf")
    height, width = frame.original_hw
    bad = (array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])
    if bad.any():
        raise PromptError(
            f"box {array[bad][0].tolist()} has x1 < x0 or y1 < y0",
            hint="boxes are (x0, y0, x1, y1) with the top-left corner first",
        )
    flat = (array[:, 2] == array[:, 0]) | (array[:, 3] == array[:, 1])
    if flat.any():  # the model answers a zero-area box with a confident empty mask
        raise PromptError(f"box {array[flat][0].tolist()} has zero width or height",
                          hint="a box must enclose the structure: x1 > x0 and y1 > y0")
    outside = (array[:, :2] < 0).any(axis=1) | (array[:, 2] > width) | (array[:, 3] > height)
    if outside.any():
        raise PromptError(
            f"box {array[outside][0].tolist()} lies outside the {width}x{height} image",
            hint="clip boxes to [0, width] x [0, height] of the image passed to set_image",
        )
    return array


def check_points(coords: np.ndarray, labels: np.ndarray, frame: ImageFrame, pre: Preprocessing):
    """Reject point prompts that are malformed or outside the image; return (B, N, 2), (B, N)."""
    points = np.asarray(coords, dtype=np.float64)
    marks = np.asarray(labels)
    if points.ndim == 2:
        points, marks = points[None], marks[None] if marks.ndim == 1 else marks
    if points.ndim != 3 or points.shape[-1] != 2 or points.shape[1] == 0:
        raise PromptError(f"point_coords must be (N, 2) or (B, N, 2); got {np.shape(coords)}")
    if marks.shape != points.shape[:2]:
        raise PromptError(
            f"point_labels shape {np.shape(labels)} does not match point_coords {np.shape(coords)}"
        )
    if not np.isfinite(points).all():
        raise PromptError("point_coords contain NaN or Inf")
    if not np.isin(marks, (-1, 0, 1)).all():
        raise PromptError(
            f"point labels must be 1 (foreground), 0 (background) or -1 (padding); got "
            f"{sorted(set(np.unique(marks).tolist()))}",
            hint="pass boxes through the boxes= argument, not as labelled points",
        )
    height, width = frame.original_hw
    xy = points[..., ::-1] if pre.point_order == "yx" else points
    if (xy < 0).any() or (xy[..., 0] > width).any() or (xy[..., 1] > height).any():
        raise PromptError(f"a point lies outside the {width}x{height} image")
    return points, marks.astype(np.float32)


@lru_cache(maxsize=32)
def _mask_maps(low_res: int, frame: ImageFrame, pre_resize: str) -> tuple[np.ndarray, np.ndarray]:
    """One matrix per axis for: bilinear to the input size, crop the padding, bilinear to original.

    Composing the three linear steps into one product keeps mask upscaling for 16 prompts at a
    few milliseconds while matching SAM's postprocess_masks to float rounding.
    """
    size = frame.input_size
    maps = []
    for axis in (0, 1):
        to_input = resize_matrix(low_res, size)
        kept = frame.resized_hw[axis] if pre_resize == "longest_side" else size
        to_orig = resize_matrix(kept, frame.original_hw[axis])
        maps.append((to_orig @ to_input[:kept]).astype(np.float32))
    return maps[0], maps[1]


@lru_cache(maxsize=32)
def _mask_taps(low_res: int, frame: ImageFrame, pre_resize: str):
    """The two ``_mask_maps`` matrices as taps: per output row, the first input index and the
    weights of the few consecutive inputs it blends (bilinear maps are banded: 2 taps for one
    resize, a handful for a composed resize). None when a map is too wide to be worth it."""
    taps = []
    for weights in _mask_maps(low_res, frame, pre_resize):
        nonzero = weights != 0
        first = nonzero.argmax(axis=1)
        last = weights.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
        width = int((last - first).max()) + 1
        if width > 8:
            return None
        first = np.minimum(first, weights.shape[1] - width)  # keep every tap inside the input
        index = first[:, None] + np.arange(width)
        taps.append((index, np.take_along_axis(weights, index, axis=1).astype(np.float32)))
    return tuple(taps)


def _blend_rows(x: np.ndarray, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``out[..., i, :] = sum_j weights[i, j] * x[..., index[i, j], :]``: whole-row gathers."""
    out = np.take(x, index[:, 0], axis=-2)
    out *= weights[:, 0, None]
    for tap in range(1, index.shape[1]):
        term = np.take(x, index[:, tap], axis=-2)
        term *= weights[:, tap, None]
        out += term
    return out


def upscale_logits(low_res: np.ndarray, frame: ImageFrame, pre: Preprocessing) -> np.ndarray:
    """(B, K, m, m) low-res logits → (B, K, H, W) logits at the original image size.

    Each axis is resampled by gathering and blending whole rows (the maps have 2–4 taps per
    output pixel), the columns on a transposed copy of the small input: 16 masks at 512² take a
    few milliseconds each instead of two dense matrix products per mask. The batch goes through
    one item at a time: all at once, its intermediates outgrow the cache.
    """
    low = low_res.astype(np.float32, copy=False)
    out = np.empty((*low.shape[:-2], *frame.original_hw), dtype=np.float32)
    for index in range(low.shape[0]):
        out[index] = _upscale_item(low[index], frame, pre)
    return out


def _upscale_item(low: np.ndarray, frame: ImageFrame, pre: Preprocessing) -> np.ndarray:
    """(K, m, m) → (K, H, W): ``upscale_logits`` for one batch item."""
    taps = _mask_taps(low.shape[-1], frame, pre.resize)
    if taps is None:
        wy, wx = _mask_maps(low.shape[-1], frame, pre.resize)
        with one_blas_thread():
            return np.einsum("hm,kmn,wn->khw", wy, low, wx, optimize=True)
    (index_y, weight_y), (index_x, weight_x) = taps
    columns = _blend_rows(np.ascontiguousarray(np.swapaxes(low, -1, -2)), index_x, weight_x)
    columns = np.ascontiguousarray(np.swapaxes(columns, -1, -2))  # (K, m, W)
    return _blend_rows(columns, index_y, weight_y)  # (K, H, W)
