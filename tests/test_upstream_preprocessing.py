"""Every family's encoder input equals its upstream pipeline's, run with the upstream libraries.

Real slices only: pydicom's CT (128², two 512², a 300×400 crop), MR (64², 300×484), nibabel's
EPI (five adjacent 128×96 slices, and crops of them) and anatomical MR (41×33). Tolerance 1e-5 on the
encoder input; measured figures are in docs/preprocessing.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import upstream_pipelines as up  # tests/ is on sys.path

from samedge.errors import ImageError
from samedge.models.litemedsam import LITEMEDSAM_PREPROCESSING
from samedge.models.masam import masam_preprocessing
from samedge.models.medsa import medsa_preprocessing
from samedge.models.sam import SAM_VARIANTS, medsam_preprocessing, sam_preprocessing
from samedge.models.sam_adapter import sam_adapter_preprocessing
from samedge.models.samed import samed_preprocessing
from samedge.runtime.transforms import preprocess, preprocess_stack

TOL = 1e-5
VIT_B = SAM_VARIANTS["vit_b"]
CT_FILES = ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm")


def _worst(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max())


@pytest.fixture(scope="module")
def ct_hu():
    """Real CT in HU at three sizes: 128², 512², and a 300×400 crop of the other 512² slice."""
    from pydicom.data import get_testdata_file

    slices = [up.hu_of(get_testdata_file(name)) for name in CT_FILES]
    return [slices[0], slices[1], slices[2][100:400, 50:450]]


@pytest.fixture(scope="module")
def mr_stacks():
    """Five adjacent real MR slices (nibabel's example4d, raw intensities over the volume's
    maximum: float [0, 1], slices of different ranges) at 128×96 and two crops, as (D, H, W)."""
    import nibabel as nib
    from nibabel.testing import data_path

    raw = nib.load(f"{data_path}/example4d.nii.gz").get_fdata()[..., 0]
    full = np.moveaxis(raw[:, :, 8:13] / raw.max(), -1, 0)
    return [full, full[:, 20:100, 8:88], full[:, 10:111, 5:62]]


def test_litemedsam_matches_cv2_inter_area(real_slices):
    """OpenCV's three INTER_AREA paths, each hit by a real slice: 2×2 blocks (512²), float32
    box sums (300×484 → 159×256), fixed-point enlarging (41×33, 64², 128²)."""
    for item in real_slices:
        got, _ = preprocess(item.image, LITEMEDSAM_PREPROCESSING)
        assert _worst(got, up.litemedsam_input(item.image)) <= TOL, item.name


def test_sam_matches_resize_longest_side(real_slices):
    pre = sam_preprocessing(VIT_B)
    for item in real_slices:
        got, _ = preprocess(item.image, pre)
        assert _worst(got, up.sam_input(item.image)) <= TOL, item.name


@pytest.mark.slow
def test_medsam_matches_skimage_resize(real_slices):
    pre = medsam_preprocessing(VIT_B)
    chosen = [s for s in real_slices if s.name in ("CT_small.dcm", "693_J2KI.dcm",
                                                   "examples_overlay.dcm", "MR_small.dcm")]
    for item in chosen:
        got, _ = preprocess(item.image, pre)
        assert _worst(got, up.medsam_input(item.image)) <= TOL, item.name


def test_sam_adapter_matches_val_dataset(real_slices):
    pre = sam_adapter_preprocessing(1024, 256)
    for item in real_slices:
        got, _ = preprocess(item.image, pre)
        assert _worst(got, up.sam_adapter_input(item.image)) <= TOL, item.name


@pytest.mark.parametrize("era", ["legacy", "2025"])
def test_medsa_2d_matches_torchvision_on_pil(real_slices, era):
    pre = medsa_preprocessing(VIT_B, era, depth=1)
    for item in real_slices:
        got, _ = preprocess(item.image, pre)
        assert _worst(got, up.medsa_2d_input(item.image, 1024, era)) <= TOL, item.name


@pytest.mark.parametrize("era", ["legacy", "2025"])
def test_medsa_3d_matches_tensor_resize(mr_stacks, era):
    """MONAI's [0, 1] float volume in, as function.py resizes it (tensor bilinear)."""
    config = SAM_VARIANTS["vit_b"]
    pre = medsa_preprocessing(config, era, depth=4)
    for stack in mr_stacks:
        volume01 = stack[:4]
        got, _ = preprocess_stack(list(volume01), pre, 4)
        want = up.medsa_3d_input(volume01, 1024, era)
        assert _worst(got, want) <= TOL, stack.shape


@pytest.mark.parametrize("input_size", [224, None])
def test_samed_matches_test_single_volume(ct_hu, input_size):
    """HU in with the family's window: clip, [0, 1], zoom to 224, zoom to 512, all in float."""
    pre = samed_preprocessing(512, 128, input_size)
    for hu in ct_hu:
        got, _ = preprocess(hu, pre, window="model")
        want = up.samed_input(up.samed_slice(hu), input_size or 512, 512)
        assert _worst(got, want) <= TOL, hu.shape


def test_samed_from_display_images_is_the_same_pipeline(ct_hu):
    """A uint8 windowed slice and its float [0, 1] twin give one input; the HU path differs by
    the window's 8-bit rounding (±0.5/255), which the two cubic zooms carry through (~0.8/255)."""
    pre = samed_preprocessing(512, 128, 224)
    hu = ct_hu[0]
    u8 = np.rint((np.clip(hu, -125, 275) + 125) * 255 / 400).astype(np.uint8)
    from_u8, _ = preprocess(u8, pre)
    np.testing.assert_array_equal(from_u8, preprocess(u8 / 255.0, pre)[0])
    assert _worst(from_u8, preprocess(hu, pre, window="model")[0]) <= 1 / 255


def test_masam_matches_test_py_on_hu_stacks(ct_hu):
    """A one-slice volume's stack (edges replicated, as MA-SAM pads volume ends), three sizes."""
    pre = masam_preprocessing(512)
    for hu in ct_hu:
        got, _ = preprocess_stack([hu] * 5, pre, 5, window="model")
        want = up.masam_input(up.masam_stack(np.stack([hu] * 5, axis=-1)), 512)
        assert _worst(got, want) <= TOL, hu.shape


def test_masam_normalizes_over_the_stack(mr_stacks):
    """Adjacent real slices that differ: min-max runs over all five (upstream's pickle)."""
    pre = masam_preprocessing(128)
    for stack in mr_stacks:
        got, _ = preprocess_stack(list(stack), pre, 5)
        want = up.masam_input(up.masam_normalized(np.moveaxis(stack, 0, -1) * 255.0), 128)
        assert _worst(got, want) <= TOL, stack.shape
        per_slice = [preprocess(s, pre)[0] for s in stack]
        assert _worst(got, np.concatenate(per_slice)) > 1e-3  # the scope is visible


# -- the image contract -----------------------------------------------------------------------
@pytest.mark.parametrize("image, match", [
    (np.zeros((8, 8), bool), "mask"),
    (np.zeros((8, 8), np.complex64), "complex"),
    (np.zeros((8, 8, 4), np.uint8), "alpha"),
    (np.full((8, 8), 2.0), r"\[0, 1\]"),
    (np.full((8, 8), -300.0), "window"),
    (np.zeros((8, 8), np.int16), "window"),
])
def test_images_outside_the_contract_are_typed_errors(image, match):
    with pytest.raises(ImageError, match=match):
        preprocess(image, LITEMEDSAM_PREPROCESSING)


def test_every_dtype_gives_the_uint8_input(ct_hu):
    """uint8, float [0, 1], uint16 (×257) and HU with the same window: one encoder input, at
    every size; before this contract, floats and uint16 were clipped to 0..255 after resizing."""
    for hu in ct_hu:
        u8 = np.rint((np.clip(hu, -160, 240) + 160) * 255 / 400).astype(np.uint8)
        want, _ = preprocess(u8, LITEMEDSAM_PREPROCESSING)
        for variant, window in ((u8 / 255.0, None), (u8.astype(np.float32) / 255, None),
                                (u8.astype(np.uint16) * 257, None), (hu, (40, 400))):
            got, _ = preprocess(variant, LITEMEDSAM_PREPROCESSING, window=window)
            np.testing.assert_array_equal(got, want)
