"""Readers, intensity windows and calibration sampling, on synthetic files and bundled real ones."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from samedge.data import dicom, images, nifti
from samedge.data.bundled import bundled_slices, bundled_volume
from samedge.data.dicom import read_dicom, read_dicom_frames, read_dicom_series
from samedge.data.images import read_image_file, read_npz
from samedge.data.nifti import read_nifti
from samedge.data.open import load_image
from samedge.data.sampling import iter_calibration_slices
from samedge.data.slices import Slice, Volume
from samedge.data.windows import parse_window, to_uint8
from samedge.errors import DataSourceError, ImageError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(nib.__file__).parent / "tests" / "data"


def make_ct(hu, position, *, series_uid: str, instance: int, slope: float = 2.0,
            intercept: float = -1024.0, orientation=(1, 0, 0, 0, 1, 0),
            photometric: str = "MONOCHROME2") -> Dataset:
    """A CT image storing (HU - intercept) / slope; ``hu`` may be (H, W) or (frames, H, W)."""
    stored = np.rint((np.asarray(hu, dtype=float) - intercept) / slope).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, "1.2.3"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.tobytes()
    return ds


def write_ct(path: Path, hu, position, **kw) -> None:
    make_ct(hu, position, **kw).save_as(path, enforce_file_format=True)


def write_series(folder: Path, zs, *, series_uid: str = "1.2.3.4", start: int = 0, **kw) -> None:
    """Slice k holds HU 100*k; files get shuffled names and reversed instance numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"IM{n:04d}" for n in range(start, start + len(zs))]
    random.Random(len(zs)).shuffle(names)
    for k, (z, name) in enumerate(zip(zs, names)):
        hu = np.full((8, 6), 100 * k)
        write_ct(folder / name, hu, (0, 0, z), series_uid=series_uid, instance=len(zs) - k, **kw)


def write_nifti(path: Path, data: np.ndarray, affine=None, slope_inter=None) -> None:
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if slope_inter:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, path)


# --- windows -----------------------------------------------------------------------------------


def test_parse_window_names_strings_pairs_and_errors():
    assert parse_window("abdomen") == (40, 400)
    assert parse_window("LUNG") == (-600, 1500)
    assert parse_window("bone") == (400, 1800)
    assert parse_window("brain") == (40, 80)
    assert parse_window("mediastinum") == (50, 350)
    assert parse_window("liver") == (60, 160)
    assert parse_window("-600, 1500") == (-600.0, 1500.0)
    assert parse_window((30, 90)) == (30.0, 90.0)
    assert parse_window(None) is None and parse_window("") is None
    for bad in ("abdomn", "40", "40,0", "40,-5", "a,b", "1,2,3", (1, 2, 3), "nan,100"):
        with pytest.raises(ImageError) as err:
            parse_window(bad)
        assert err.value.hint and "abdomen" in err.value.hint


def test_ct_window_maps_hu_linearly_and_defaults_to_abdomen():
    hu = np.array([[-1000.0, -160.0, 40.0, 140.0, 240.0, 1000.0]])
    out = to_uint8(hu, "CT")
    assert out.shape == (1, 6, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 2]).all()
    # (HU + 160) / 400 * 255: 127.5 rounds to 128, 191.25 to 191
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 128, 191, 255, 255])
    lung = to_uint8(hu, "CT", "lung")[0, :, 0]
    np.testing.assert_array_equal(lung, np.rint((np.clip(hu[0], -1350, 150) + 1350) / 1500 * 255))
    assert to_uint8(hu, "MR", "40,400")[0, 3, 0] == 191  # explicit windows apply to any modality


def test_mr_percentile_scaling_ignores_background_and_outliers():
    rng = np.random.default_rng(0)
    image = np.zeros((100, 100))
    image[20:80, 20:80] = rng.uniform(100, 200, (60, 60))
    image[50, 50] = 1e6  # one hot pixel must not compress the range
    out = to_uint8(image, "MR")[..., 0]
    low, high = np.percentile(image[image != 0], [0.5, 99.5])
    expected = np.rint((np.clip(image, low, high) - low) / (high - low) * 255)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == 0 and out[50, 50] == 255
    assert 110 < np.median(out[20:80, 20:80]) < 145  # the tissue keeps the full contrast range
    assert low > 100 and high < 201


def test_blank_constant_and_8bit_images():
    for modality in ("MR", "OT", "PT"):
        assert not to_uint8(np.zeros((4, 5)), modality).any()
    assert (to_uint8(np.zeros((4, 5)), "CT") == 102).all()  # 0 HU is water: (0 + 160) / 400
    assert not to_uint8(np.full((4, 5), 7.0), "MR").any()
    gray8 = np.arange(20, dtype=np.uint8).reshape(4, 5)
    np.testing.assert_array_equal(to_uint8(gray8, "US")[..., 1], gray8)  # display-ready: kept
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    np.testing.assert_array_equal(to_uint8(rgba, "US"), rgba[..., :3])


def test_nan_inf_and_wrong_dimensions_raise_image_error():
    bad = np.ones((4, 4))
    bad[1, 1] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        to_uint8(bad, "MR")
    with pytest.raises(ImageError, match="NaN"):
        to_uint8(np.full((4, 4), np.inf), "CT")
    for shape in ((4,), (2, 4, 4, 1, 1), (4, 4, 5), (0, 4)):
        with pytest.raises(ImageError):
            to_uint8(np.ones(shape), "MR")


# --- DICOM -------------------------------------------------------------------------------------


def test_dicom_series_is_ordered_by_position_and_windowed_in_hu(tmp_path):
    zs = [10.0, 12.5, 15.0, 17.5, 20.0]
    write_series(tmp_path / "ct", zs[::-1])  # slice k (HU 100k) lies at zs[::-1][k], files shuffled
    volume = read_dicom_series(tmp_path / "ct", window="200,1000")
    assert len(volume) == 5 and volume.modality == "CT"
    for i, hu in enumerate([400, 300, 200, 100, 0]):  # ascending position
        item = volume[i]
        assert item.image.shape == (8, 6, 3) and item.modality == "CT"
        # HU = 2 * stored - 1024, then window [-300, 700]; without the rescale HU 400 would read 712
        assert item.image[0, 0, 0] == round((hu + 300) / 1000 * 255)


def test_dicom_series_default_window_is_abdomen_and_skips_non_images(tmp_path):
    write_series(tmp_path / "ct", [0.0, 3.0, 6.0])
    shutil.copy(PYDICOM_FILES / "rtplan.dcm", tmp_path / "ct" / "plan.dcm")  # no pixels
    values = [read_dicom_series(tmp_path / "ct")[i].image[0, 0, 0] for i in range(3)]
    assert values == [round((hu + 160) / 400 * 255) for hu in (0, 100, 200)]


def test_dicom_series_orders_along_oblique_normal_not_z(tmp_path):
    # Sagittal slices: the normal is -x, positions differ in x only and z is identical.
    folder = tmp_path / "sag"
    folder.mkdir()
    for k, x in enumerate([5.0, -5.0, 0.0]):
        write_ct(folder / f"f{k}.dcm", np.full((4, 4), 100 * k), (x, 0, 0), series_uid="9.9",
                 instance=k + 1, orientation=(0, 1, 0, 0, 0, -1))
    names = [s.name for s in read_dicom_series(folder)]
    assert names == ["f0.dcm", "f2.dcm", "f1.dcm"]  # dot((x,0,0), (-1,0,0)) ascending: x = 5, 0, -5


def test_dicom_series_reads_headers_only_until_accessed(tmp_path, monkeypatch):
    write_series(tmp_path / "ct", [0.0, 1.0, 2.0, 3.0])
    calls = []
    real = dicom.read_dicom
    spy = lambda path, w=None: calls.append(path) or real(path, w)  # noqa: E731
    monkeypatch.setattr(dicom, "read_dicom", spy)
    volume = read_dicom_series(tmp_path / "ct")
    assert calls == []
    volume[2]
    assert len(calls) == 1


def test_missing_slice_and_duplicate_position_raise(tmp_path):
    write_series(tmp_path / "gap", [0.0, 2.0, 4.0, 8.0, 10.0])
    with pytest.raises(DataSourceError, match=r"gap of 4\.000.*spacing 2\.000.*1 slice") as err:
        read_dicom_series(tmp_path / "gap")
    assert err.value.hint
    write_series(tmp_path / "dup", [0.0, 2.0, 2.0, 4.0])
    with pytest.raises(DataSourceError, match="same position"):
        read_dicom_series(tmp_path / "dup")


def test_mixed_series_raise_unless_one_is_chosen(tmp_path):
    write_series(tmp_path / "mix", [0.0, 1.0, 2.0], series_uid="1.1.1")
    write_series(tmp_path / "mix", [0.0, 5.0], series_uid="2.2.2", start=10)
    with pytest.raises(DataSourceError, match=r"2 DICOM series.*1\.1\.1.*2\.2\.2") as err:
        read_dicom_series(tmp_path / "mix")
    assert "series_uid" in err.value.hint
    assert len(read_dicom_series(tmp_path / "mix", series_uid="2.2.2")) == 2
    with pytest.raises(DataSourceError, match="not found"):
        read_dicom_series(tmp_path / "mix", series_uid="3.3.3")


def test_empty_or_unreadable_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError):
        read_dicom_series(tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(b"not a dicom file")
    with pytest.raises(DataSourceError, match="unreadable"):
        read_dicom_series(junk)
    with pytest.raises(DataSourceError):
        iter_calibration_slices([tmp_path / "empty"], 10)
    with pytest.raises(DataSourceError):
        iter_calibration_slices([junk], 10)


def test_monochrome1_is_inverted(tmp_path):
    write_ct(tmp_path / "m1.dcm", np.array([[-160, 240]]), (0, 0, 0), series_uid="1", instance=1,
             photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_dicom(tmp_path / "m1.dcm").image[0, :, 0], [255, 0])


def test_dicom_without_extension_ybr_and_multiframe(tmp_path):
    plain = tmp_path / "ctfile"
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", plain)
    assert load_image(plain).image.shape == (128, 128, 3)
    ybr = read_dicom(PYDICOM_FILES / "SC_ybr_full_422_uncompressed.dcm")
    assert ybr.image[0, 0, 0] > 240 and ybr.image[0, 0, 1:].max() < 15  # red after YBR -> RGB
    multi = PYDICOM_FILES / "SC_rgb_rle_2frame.dcm"
    with pytest.raises(ImageError, match="2 frames"):
        read_dicom(multi)
    frames = read_dicom_frames(multi)
    assert len(frames) == 2 and frames[1].image.shape == (100, 100, 3)
    assert frames[1].name.endswith("[frame=1]")
    assert load_image(multi, slice_index=0).name.endswith("[frame=0]")


def test_palette_colour_dicom_becomes_rgb():
    item = read_dicom(PYDICOM_FILES / "examples_palette.dcm")
    assert item.modality == "US" and item.image.shape == (350, 800, 3)
    assert (item.image[..., 0] != item.image[..., 2]).any()  # the colour LUT was applied


def test_enhanced_multiframe_rescale_from_functional_groups(tmp_path):
    hu = np.stack([np.full((4, 4), 40.0), np.full((4, 4), 140.0)])
    ds = make_ct(hu, (0, 0, 0), series_uid="5.5", instance=1)  # stored with slope 2, -1024
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.NumberOfFrames = 2
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -1024, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    frames = read_dicom_frames(tmp_path / "enhanced.dcm")
    assert [frames[i].image[0, 0, 0] for i in range(2)] == [128, 191]  # abdomen window of 40, 140


# --- NIfTI, images, npz ------------------------------------------------------------------------


def test_nifti_slices_are_lazy_scaled_and_ordered(tmp_path):
    data = np.zeros((6, 4, 5), np.int16)
    for z in range(5):
        data[:, :, z] = 10 * z
    data[1, 2, 3] = 60
    write_nifti(tmp_path / "v.nii.gz", data, slope_inter=(2.0, -100.0))
    volume = read_nifti(tmp_path / "v.nii.gz", modality="CT", window="0,200")
    assert len(volume) == 5
    item = volume[3]
    assert item.name == "v.nii.gz[z=3]" and item.modality == "CT"
    assert item.image.shape == (4, 6, 3)  # rows = second voxel axis
    hu = 2 * 30 - 100  # scl_slope/scl_inter applied: -40 HU -> (-40 + 100) / 200
    assert item.image[0, 0, 0] == round((hu + 100) / 200 * 255)
    assert item.image[2, 1, 0] == round((2 * 60 - 100 + 100) / 200 * 255)
    flipped = np.diag([1.0, 1.0, -1.0, 1.0])
    write_nifti(tmp_path / "f.nii", data, affine=flipped)
    assert [s.name for s in read_nifti(tmp_path / "f.nii")][:2] == ["f.nii[z=4]", "f.nii[z=3]"]


def test_nifti_4d_frame_and_middle_slice_default(tmp_path):
    data = np.stack([np.full((4, 4, 7), 5.0), np.zeros((4, 4, 7))], axis=-1).astype(np.float32)
    data[0, 0, :, 0] = 50
    write_nifti(tmp_path / "t.nii", data)
    assert read_nifti(tmp_path / "t.nii")[0].image.any()
    assert not read_nifti(tmp_path / "t.nii", frame=1)[0].image.any()
    with pytest.raises(DataSourceError, match="frame=2"):
        read_nifti(tmp_path / "t.nii", frame=2)
    assert load_image(tmp_path / "t.nii").name == "t.nii[z=3]"
    assert load_image(tmp_path / "t.nii", slice_index=-1).name == "t.nii[z=6]"
    with pytest.raises(ImageError, match="out of range"):
        load_image(tmp_path / "t.nii", slice_index=7)


def test_nan_in_a_file_raises_image_error(tmp_path):
    data = np.ones((4, 4, 3), np.float32)
    data[2, 2, 1] = np.nan
    write_nifti(tmp_path / "nan.nii", data)
    with pytest.raises(ImageError, match="NaN"):
        load_image(tmp_path / "nan.nii")
    np.savez(tmp_path / "nan.npz", image=np.full((3, 3), np.nan))
    with pytest.raises(ImageError, match="NaN"):
        read_npz(tmp_path / "nan.npz")


def test_png_8bit_rgba_and_16bit(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray).save(tmp_path / "g.png")
    item = read_image_file(tmp_path / "g.png")
    assert item.image.shape == (6, 8, 3) and item.modality == "OT"
    np.testing.assert_array_equal(item.image, np.repeat(gray[..., None], 3, -1))
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 77, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    np.testing.assert_array_equal(load_image(tmp_path / "c.png").image, rgba[..., :3])
    deep = (np.arange(1, 101, dtype=np.uint16).reshape(10, 10) * 600)
    Image.fromarray(deep).save(tmp_path / "d.png")
    scaled = read_image_file(tmp_path / "d.png").image[..., 0]
    assert scaled.min() == 0 and scaled.max() == 255
    assert (np.diff(scaled.ravel().astype(int)) >= 0).all()  # monotonic
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageError):
        read_image_file(tmp_path / "broken.png")


def test_npz_2d_with_mask_and_box_and_3d_volume(tmp_path):
    image = np.arange(30, dtype=np.uint8).reshape(5, 6)
    mask = (image > 10).astype(np.uint8)
    np.savez(tmp_path / "s.npz", img=image, gts=mask, boxes=np.array([[1, 2, 4, 5], [0, 0, 1, 1]]))
    item = read_npz(tmp_path / "s.npz")
    assert isinstance(item, Slice)
    np.testing.assert_array_equal(item.mask, mask)
    np.testing.assert_array_equal(item.box, [1.0, 2.0, 4.0, 5.0])
    volume_data = np.zeros((4, 5, 6), np.uint8)
    volume_data[2] = 9
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[2, 1:3, 1:3] = 1
    boxes = np.array([[1, 1, 2, 3, 3, 2]])  # x0, y0, z0, x1, y1, z1
    np.savez_compressed(tmp_path / "v.npz", imgs=volume_data, gts=labels, boxes=boxes)
    volume = read_npz(tmp_path / "v.npz")
    assert isinstance(volume, Volume) and len(volume) == 4
    middle = volume[2]
    assert middle.image[0, 0, 0] == 9 and middle.mask.sum() == 4
    np.testing.assert_array_equal(middle.box, [1, 1, 3, 3])
    assert volume[0].box is None
    assert load_image(tmp_path / "v.npz").name == "v.npz[z=2]"
    np.savez(tmp_path / "nokey.npz", pixels=image)
    with pytest.raises(ImageError, match="no image array"):
        read_npz(tmp_path / "nokey.npz")
    np.savez(tmp_path / "badmask.npz", image=image, mask=np.zeros((2, 2)))
    with pytest.raises(ImageError, match="mask shape"):
        read_npz(tmp_path / "badmask.npz")


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="unsupported"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="single image"):
        load_image(PYDICOM_FILES / "CT_small.dcm", slice_index=3)


def test_volume_stack_replicates_edges(tmp_path):
    write_nifti(tmp_path / "s.nii", np.zeros((3, 3, 6), np.int16))
    volume = read_nifti(tmp_path / "s.nii")
    assert [s.name[-4:-1] for s in volume.stack(0)] == ["z=0", "z=0", "z=0", "z=1", "z=2"]
    assert [s.name[-4:-1] for s in volume.stack(3)] == ["z=1", "z=2", "z=3", "z=4", "z=5"]
    assert [s.name[-4:-1] for s in volume.stack(5, depth=3)] == ["z=4", "z=5", "z=5"]
    with pytest.raises(IndexError):
        volume.stack(6)
    with pytest.raises(IndexError):
        volume[-7]


# --- calibration sampling ----------------------------------------------------------------------


def make_sources(tmp_path: Path) -> list[Path]:
    for name in ("a", "b"):
        data = np.random.default_rng(0).uniform(1, 100, (8, 8, 20)).astype(np.float32)
        write_nifti(tmp_path / f"{name}.nii.gz", data)
    write_series(tmp_path / "ct", [float(z) for z in range(10)])
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for k in range(2):
        Image.fromarray(np.full((5, 5), 40 * k, np.uint8)).save(pngs / f"p{k}.png")
    return [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "ct", pngs]


def source_of(item: Slice) -> str:
    return item.source.name if item.source.name.endswith(".nii.gz") else item.source.parent.name


def test_sampling_spreads_across_sources_and_along_volumes(tmp_path):
    paths = make_sources(tmp_path)
    picked = list(iter_calibration_slices(paths, 14, seed=3))
    assert len(picked) == 14
    expected = {"a.nii.gz": 4, "b.nii.gz": 4, "ct": 4, "pngs": 2}  # 20, 20, 10 and 2 slices
    per_source = {name: [s for s in picked if source_of(s) == name] for name in expected}
    assert {k: len(v) for k, v in per_source.items()} == expected
    for name in ("a.nii.gz", "b.nii.gz"):
        zs = sorted(int(s.name.split("z=")[1][:-1]) for s in per_source[name])
        assert min(np.diff(zs)) >= 4 and zs[0] < 5 and zs[-1] >= 15  # evenly spread, not neighbours
    assert len({s.name for s in picked}) == 14
    first_round = {source_of(s) for s in picked[:4]}
    assert first_round == set(per_source)  # round-robin: every source before any repeats
    assert [s.name for s in iter_calibration_slices(paths, 14, seed=3)] == [s.name for s in picked]


def test_sampling_is_lazy(tmp_path, monkeypatch):
    paths = make_sources(tmp_path)
    decoded = []
    real = images.to_uint8
    for reader in (dicom, images, nifti):
        monkeypatch.setattr(reader, "to_uint8", lambda *a, **k: decoded.append(1) or real(*a, **k))
    stream = iter_calibration_slices(paths, 300, augment=True)
    assert decoded == [] and iter(stream) is stream and not isinstance(stream, list)
    next(stream)
    next(stream)
    assert len(decoded) == 2
    assert sum(1 for _ in stream) == 298


def test_scarce_data_warns_or_augments(tmp_path):
    paths = make_sources(tmp_path)[2:]  # 10 CT slices + 2 PNGs
    with pytest.warns(UserWarning, match="only 12"):
        assert len(list(iter_calibration_slices(paths, 20))) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topped = list(iter_calibration_slices(paths, 20, augment=True, seed=1))
    assert len(topped) == 20 and sum(s.name.endswith("[aug]") for s in topped) == 8
    assert not any(s.name.endswith("[aug]") for s in topped[:12])
    again = list(iter_calibration_slices(paths, 20, augment=True, seed=1))
    assert all(np.array_equal(x.image, y.image) for x, y in zip(topped, again))


def test_augment_flips_mask_and_box_consistently(tmp_path):
    image = np.zeros((4, 10), np.uint8)
    image[:, :2] = 200
    mask = np.zeros((4, 10), np.uint8)
    mask[:, :2] = 1
    np.savez(tmp_path / "one.npz", image=image, mask=mask, box=np.array([0, 0, 2, 4]))
    augmented = list(iter_calibration_slices([tmp_path / "one.npz"], 12, augment=True, seed=0))[1:]
    flipped = [s for s in augmented if s.mask[0, -1]]
    assert flipped and len(flipped) < len(augmented)
    for item in flipped:
        np.testing.assert_array_equal(item.box, [8, 0, 10, 4])
        assert item.image[0, -1, 0] > 150 and item.image[0, 0, 0] < 20


def test_sampling_rejects_bad_inputs(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        iter_calibration_slices([tmp_path / "missing"], 5)
    with pytest.raises(DataSourceError):
        iter_calibration_slices([], 5)
    (tmp_path / "bad.nii").write_bytes(b"nope")
    with pytest.raises(DataSourceError, match="unusable"):
        iter_calibration_slices([tmp_path / "bad.nii"], 5)
    write_series(tmp_path / "gap", [0.0, 1.0, 5.0])
    with pytest.raises(DataSourceError, match="gap"):
        iter_calibration_slices([tmp_path / "gap"], 5)
    with pytest.raises(DataSourceError):
        iter_calibration_slices([tmp_path / "bad.nii"], 0)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataSourceError, match="unusable"):
        list(iter_calibration_slices([tmp_path / "bad.png"], 1))


# --- bundled real data -------------------------------------------------------------------------


def test_bundled_slices_are_the_real_files():
    slices = bundled_slices()
    expected = [
        ("CT_small.dcm", "CT", (128, 128)),
        ("MR_small.dcm", "MR", (64, 64)),
        ("693_J2KI.dcm", "CT", (512, 512)),
        ("J2K_pixelrep_mismatch.dcm", "CT", (512, 512)),
        ("examples_overlay.dcm", "MR", (300, 484)),
        ("example4d.nii.gz[z=4]", "MR", (96, 128)),
        ("example4d.nii.gz[z=12]", "MR", (96, 128)),
        ("example4d.nii.gz[z=20]", "MR", (96, 128)),
        ("anatomical.nii[z=12]", "MR", (41, 33)),
    ]
    assert [(s.name, s.modality, s.image.shape[:2]) for s in slices] == expected
    for item in slices:
        assert item.image.dtype == np.uint8 and item.image.shape[2] == 3 and item.source.exists()
        assert item.image.max() == 255 and 20 < item.image.mean() < 200  # real anatomy, not blank
    ct = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    np.testing.assert_array_equal(slices[0].image[..., 0], to_uint8(hu, "CT", "abdomen")[..., 0])


def test_bundled_volume_is_example4d_first_frame():
    volume = bundled_volume()
    assert len(volume) == 24 and volume.modality == "MR"
    expected = np.asarray(nib.load(NIBABEL_FILES / "example4d.nii.gz").dataobj[:, :, 7, 0]).T
    np.testing.assert_array_equal(volume[7].image[..., 0], to_uint8(expected, "MR")[..., 0])
    names = [s.name for s in volume.stack(23, depth=3)]
    assert names == ["example4d.nii.gz[z=22]", "example4d.nii.gz[z=23]", "example4d.nii.gz[z=23]"]
