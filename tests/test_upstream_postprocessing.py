"""Every family's mask postprocessing equals its upstream script's, given the same logits.

Low-res logits are smooth random fields (so masks have boundaries everywhere), on the frames of
real slices of several sizes (64², 128², 512², 300×484, 41×33, 128×96). Masks and label maps must
agree on every pixel except those whose upstream decision lies within float noise of flipping
(``FLOAT_NOISE`` from the threshold or the runner-up class), which must stay rare.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import upstream_pipelines as up  # tests/ is on sys.path
from scipy.ndimage import gaussian_filter

from samedge.models.litemedsam import LITEMEDSAM_PREPROCESSING
from samedge.models.masam import masam_preprocessing
from samedge.models.medsa import medsa_preprocessing
from samedge.models.sam import SAM_VARIANTS, medsam_preprocessing, sam_preprocessing
from samedge.models.samed import samed_preprocessing
from samedge.runtime.postprocess import mask_scores, prompt_masks, semantic_maps
from samedge.runtime.transforms import ImageFrame, resized_shape

FLOAT_NOISE = up.FLOAT_NOISE
UNDECIDED = 1e-3  # smooth fields of ±10: pixels within float noise of a decision are rare
SHAPES = [(64, 64), (128, 128), (512, 512), (300, 484), (41, 33), (96, 128)]
VIT_B = SAM_VARIANTS["vit_b"]


def _logits(batch: int, channels: int, size: int, seed: int) -> np.ndarray:
    """Smooth fields with SAM-like magnitudes (±10), so thresholds cross everywhere."""
    noise = np.random.default_rng(seed).normal(size=(batch, channels, size, size))
    smooth = gaussian_filter(noise, sigma=(0, 0, 3, 3))
    return (smooth / smooth.std() * 6).astype(np.float32)


def _frame(shape, pre) -> ImageFrame:
    return ImageFrame(shape, resized_shape(*shape, pre), pre.image_size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", ["litemedsam", "sam"])
def test_sam_style_masks(shape, family):
    pre = LITEMEDSAM_PREPROCESSING if family == "litemedsam" else sam_preprocessing(VIT_B)
    frame = _frame(shape, pre)
    low = _logits(3, 1, pre.mask_size, seed=shape[0])
    got = prompt_masks(mask_scores(low, frame, pre), pre)
    want = up.sam_masks(torch.from_numpy(low), pre.image_size, frame.resized_hw, *shape,
                        sigmoid=family == "litemedsam")
    scores = mask_scores(low, frame, pre)
    up.assert_agree_where_decided(got, want, up.decision_margin(scores, 0.0), FLOAT_NOISE,
                                  UNDECIDED)


@pytest.mark.parametrize("shape", SHAPES)
def test_medsam_thresholds_resized_probabilities(shape):
    pre = medsam_preprocessing(VIT_B)
    frame = _frame(shape, pre)
    low = _logits(2, 1, pre.mask_size, seed=shape[1])
    scores = mask_scores(low, frame, pre)
    want = up.medsam_mask(torch.from_numpy(low), *shape)
    up.assert_agree_where_decided(prompt_masks(scores, pre), want,
                                  up.decision_margin(scores, 0.5), FLOAT_NOISE, UNDECIDED)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("era, depth", [("legacy", 1), ("2025", 1), ("legacy", 4), ("2025", 4)])
def test_medsa_masks(shape, era, depth):
    pre = medsa_preprocessing(VIT_B, era, depth=depth)
    frame = _frame(shape, pre)
    low = _logits(2, 1, pre.mask_size, seed=depth)
    scores = mask_scores(low, frame, pre)
    want = up.medsa_masks(torch.from_numpy(low), *shape, era)
    up.assert_agree_where_decided(prompt_masks(scores, pre), want,
                                  up.decision_margin(scores, pre.mask_threshold), FLOAT_NOISE,
                                  UNDECIDED)


@pytest.mark.parametrize("shape", SHAPES)
def test_samed_labels(shape):
    """Argmax at the input size, the label map zoomed with order 0: the margin is the input-size
    one, carried to each output pixel by the same nearest zoom."""
    pre = samed_preprocessing(128, 32, 224)
    frame = _frame(shape, pre)
    low = _logits(1, 4, pre.mask_size, seed=7)
    _, labels = semantic_maps(low, frame, pre)
    masks = torch.nn.functional.interpolate(torch.from_numpy(low), (128, 128), mode="bilinear",
                                            align_corners=False)
    want = up.samed_labels(masks, *shape)
    up.assert_agree_where_decided(labels, want, up.samed_margin(masks, *shape), FLOAT_NOISE,
                                  UNDECIDED)


@pytest.mark.parametrize("shape", SHAPES)
def test_masam_labels(shape):
    pre = masam_preprocessing(128)
    frame = _frame(shape, pre)
    low = _logits(2, 3, 128, seed=11)
    probabilities, labels = semantic_maps(low, frame, pre)
    want = up.masam_labels(torch.from_numpy(low), *shape)
    up.assert_agree_where_decided(labels, want, up.decision_margin(probabilities), FLOAT_NOISE,
                                  UNDECIDED)
