"""The numpy preprocessing reproduces the upstream resizers and SAM's mask postprocessing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samedge.errors import ImageError, PromptError
from samedge.models.litemedsam import LITEMEDSAM_PREPROCESSING
from samedge.runtime.transforms import (
    ImageFrame,
    Preprocessing,
    check_boxes,
    check_points,
    preprocess,
    resize,
    transform_boxes,
    upscale_logits,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape, out", [
    ((512, 512), (256, 256)), ((512, 258), (256, 129)), ((768, 384), (256, 128)),  # blocks
    ((512, 6), (256, 3)), ((300, 484), (159, 256)), ((97, 61), (45, 28)),  # float32 box sums
    ((300, 1), (256, 1)), ((128, 128), (256, 256)), ((41, 33), (256, 206)),  # enlarging
    ((255, 3), (256, 3)), ((1, 40), (6, 256))])
@pytest.mark.parametrize("channels", [1, 3])
def test_area_resize_is_opencv_bit_for_bit(shape, out, channels):
    """Every INTER_AREA path OpenCV takes, on uint8 noise (every rounding case gets hit)."""
    image = RNG.integers(0, 256, (*shape, channels)).astype(np.uint8)
    image = image[..., 0] if channels == 1 else image
    expected = cv2.resize(image, out[::-1], interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(resize(image, out, "area"), expected)


def test_area_resize_is_opencv_bit_for_bit_at_random_sizes():
    for _ in range(40):
        shape = tuple(int(n) for n in RNG.integers(2, 700, 2))
        scale = 256 / max(shape)
        out = (int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5))
        image = RNG.integers(0, 256, (*shape, 3)).astype(np.uint8)
        expected = cv2.resize(image, out[::-1], interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(resize(image, out, "area"), expected, err_msg=str(shape))


def test_bilinear_resize_matches_torch():
    image = RNG.normal(size=(64, 80)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(image)[None, None], (150, 37), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(resize(image, (150, 37), "bilinear"), expected, atol=1e-4)


def test_litemedsam_preprocessing_matches_upstream_recipe():
    """CVPR24_LiteMedSAM_infer: cv2 INTER_AREA to long side 256, min-max to [0,1], pad."""
    image = RNG.integers(0, 256, (300, 484, 3)).astype(np.uint8)
    resized = cv2.resize(image, (256, 159), interpolation=cv2.INTER_AREA).astype(np.float64)
    norm = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
    expected = np.zeros((1, 3, 256, 256), np.float32)
    expected[0, :, :159, :256] = norm.transpose(2, 0, 1)
    tensor, frame = preprocess(image, LITEMEDSAM_PREPROCESSING)
    assert frame == ImageFrame((300, 484), (159, 256), 256)
    assert np.abs(tensor - expected).max() <= 1e-6


def test_upscale_matches_sam_postprocess():
    pre = Preprocessing(image_size=1024, interpolation="pil_bilinear", mask_size=256)
    frame = ImageFrame((300, 484), (635, 1024), 1024)
    low = RNG.normal(size=(3, 2, 256, 256)).astype(np.float32)
    masks = F.interpolate(torch.from_numpy(low), (1024, 1024), mode="bilinear",
                          align_corners=False)[..., :635, :1024]
    expected = F.interpolate(masks, (300, 484), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(upscale_logits(low, frame, pre), expected, atol=2e-4)


def test_upscale_dense_maps_match_taps_item_by_item(monkeypatch):
    """Maps too wide for taps fall back to dense products; both paths give the same batch."""
    from samedge.runtime import transforms

    frame = ImageFrame((300, 484), (159, 256), 256)
    low = RNG.normal(size=(3, 2, 256, 256)).astype(np.float32)
    banded = upscale_logits(low, frame, LITEMEDSAM_PREPROCESSING)
    monkeypatch.setattr(transforms, "_mask_taps", lambda *args: None)
    dense = upscale_logits(low, frame, LITEMEDSAM_PREPROCESSING)
    assert banded.shape == dense.shape == (3, 2, 300, 484)
    np.testing.assert_allclose(dense, banded, atol=1e-5)


def test_litemedsam_boxes_truncate_like_upstream():
    frame = ImageFrame((300, 484), (159, 256), 256)
    corners = transform_boxes(np.array([[10.7, 20.2, 300.9, 250.5]]), frame,
                              LITEMEDSAM_PREPROCESSING)
    scale = 256 / 484
    expected = [int(10.7 * scale), int(20.2 * scale), int(300.9 * scale), int(250.5 * scale)]
    assert corners.reshape(-1).tolist() == expected


@pytest.mark.parametrize("image", [np.zeros((0, 5)), np.zeros((4, 4, 4, 4)),
                                   np.full((8, 8), np.nan), np.array([["a"]])])
def test_bad_images_are_rejected(image):
    with pytest.raises(ImageError):
        preprocess(image, LITEMEDSAM_PREPROCESSING)


@pytest.mark.parametrize("boxes", [[10, 10, 5, 20], [-1, 0, 10, 10], [0, 0, 65, 10],
                                   [0, 0, np.nan, 3], [[1, 2, 3]]])
def test_bad_boxes_are_rejected(boxes):
    with pytest.raises(PromptError):
        check_boxes(np.array(boxes, dtype=float), ImageFrame((48, 64), (192, 256), 256))


def test_bad_points_are_rejected():
    frame = ImageFrame((48, 64), (192, 256), 256)
    with pytest.raises(PromptError, match="outside"):
        check_points([[70, 3]], [1], frame, LITEMEDSAM_PREPROCESSING)
    with pytest.raises(PromptError, match="labels"):
        check_points([[7, 3]], [2], frame, LITEMEDSAM_PREPROCESSING)
    with pytest.raises(PromptError, match="shape"):
        check_points([[7, 3]], [1, 1], frame, LITEMEDSAM_PREPROCESSING)
