"""Real medical images shipped inside pydicom and nibabel: the toolkit's default data."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

from samedge.data.dicom import read_dicom
from samedge.data.formats import DATA_HINT
from samedge.data.nifti import read_nifti
from samedge.data.open import load_image
from samedge.data.slices import Slice, Volume, evenly_spaced
from samedge.errors import DataSourceError, ImageError

BUNDLED_DICOM = (
    "CT_small.dcm",
    "MR_small.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "examples_overlay.dcm",
)
BUNDLED_EPI_SLICES = 3


def _package_dir(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent.joinpath(*parts) if spec is not None and spec.origin else None


def _spread(volume: Volume, count: int) -> list[Slice]:
    return [volume[i] for i in evenly_spaced(len(volume), count)]


def bundled_slices() -> list[Slice]:
    """Real medical slices shipped inside pydicom and nibabel: the toolkit's default data.

    In order: CT 128^2, MR 64^2, two CT 512^2 (JPEG 2000), MR 300x484, three slices of an MR EPI
    series and one of an anatomical MR. Files whose decoder is missing are skipped with a warning.
    """
    loaders: list[tuple[str, Callable[[], list[Slice]]]] = []
    dicom_dir = _package_dir("pydicom", "data", "test_files")
    if dicom_dir is not None:
        loaders += [(name, lambda p=dicom_dir / name: [read_dicom(p)]) for name in BUNDLED_DICOM]
    nifti_dir = _package_dir("nibabel", "tests", "data")
    if nifti_dir is not None:
        epi = nifti_dir / "example4d.nii.gz"
        loaders.append((epi.name, lambda: _spread(read_nifti(epi), BUNDLED_EPI_SLICES)))
        loaders.append(("anatomical.nii", lambda: [load_image(nifti_dir / "anatomical.nii")]))
    if not loaders:
        raise DataSourceError("no bundled images: neither pydicom nor nibabel installed", DATA_HINT)
    slices: list[Slice] = []
    for name, load in loaders:
        try:
            slices += load()
        except (ImageError, DataSourceError) as exc:
            warnings.warn(f"skipping bundled {name}: {exc.args[0]}", stacklevel=2)
    if not slices:
        raise DataSourceError("none of the bundled medical images could be read", DATA_HINT)
    return slices


def bundled_volume() -> Volume:
    """The first frame of nibabel's example4d.nii.gz: 24 adjacent 128x96 MR slices for 3-D tests."""
    nifti_dir = _package_dir("nibabel", "tests", "data")
    if nifti_dir is None:
        raise DataSourceError("the bundled volume needs nibabel, which is not installed", DATA_HINT)
    return read_nifti(nifti_dir / "example4d.nii.gz", "MR")


def bundled_stacks(depth: int, count: int = 2) -> list[list[Slice]]:
    """``count`` stacks of ``depth`` adjacent slices of :func:`bundled_volume` for depth models:
    the first centred on its first slice (missing neighbours replicated, as MA-SAM pads the volume
    ends), the others spread over the volume."""
    volume = bundled_volume()
    return [volume.stack(centre, depth) for centre in [0, *evenly_spaced(len(volume), count - 1)]]


# Hold-out is by subject: no patient (DICOM PatientID; for nibabel's files, the acquisition) gives
# both calibration/tuning slices and validation slices. The validation subjects are those of
# ``bundled_slices()`` and ``PIPELINE_EXTRA``: CT 1CT1, CQ500-CT-310, JXD191021006; MR 4MR1,
# 021234567, nibabel's example4d (example_nifti2 shares its header and affine: the same subject)
# and anatomical (reoriented/resampled_anat_moved and functional are that subject's too);
# ultrasound 13US1 (examples_rgb_color, and examples_jpeg2k: the same clip at twice the size).
# Calibration gets the rest: nuclear medicine 8NM1 and two other ultrasound patients. image_dfl.dcm
# is a synthetic test pattern, not a scan, and stays out. So the default calibration holds no CT
# or MR: for those, `samedge calibrate --data` on your own scans.
BUNDLED_CALIBRATION_DICOM = ("JPEG2000.dcm", "examples_ybr_color.dcm", "examples_palette.dcm")
BUNDLED_CALIBRATION_NIFTI: tuple[str, ...] = ()

# What `samedge pipeline` validates on beyond ``bundled_slices()``: more slices of the EPI volume
# (between the three bundled ones) and an ultrasound frame, so its gate sees 12 slices of three
# modalities and six subjects.
PIPELINE_EPI_SLICES = (8, 16)
PIPELINE_EXTRA_DICOM = ("examples_rgb_color.dcm",)


def pipeline_validation_slices() -> list[Slice]:
    """The pipeline's validation slices: ``bundled_slices()`` plus ``PIPELINE_EXTRA`` (subjects
    disjoint from the calibration pool)."""
    slices = bundled_slices()
    nifti_dir = _package_dir("nibabel", "tests", "data")
    if nifti_dir is not None and (nifti_dir / "example4d.nii.gz").is_file():
        volume = read_nifti(nifti_dir / "example4d.nii.gz")
        slices += [volume[z] for z in PIPELINE_EPI_SLICES]
    dicom_dir = _package_dir("pydicom", "data", "test_files")
    for name in PIPELINE_EXTRA_DICOM if dicom_dir is not None else ():
        try:
            slices.append(read_dicom(dicom_dir / name))
        except (ImageError, DataSourceError) as exc:
            warnings.warn(f"skipping bundled {name}: {exc.args[0]}", stacklevel=2)
    return slices


# Held out from every step of `samedge pipeline` (export check, calibration, tuning, validation,
# timing), for `samedge validate` to measure a bundle on data its gates never saw. 2-D models: a
# subject no step reads (nibabel's Siemens TOF angiography MIP, 384²) and the EPI and anatomical
# slices between those the pipeline validates on (their subjects are validation subjects, so these
# are held out by slice). Depth models: stacks of the anatomical volume (a subject the depth
# pipeline never reads) and one EPI stack centred between the pipeline's stacks, sharing no slice
# with them for depths up to 5 (MA-SAM's).
HELD_OUT_DICOM = ("slicethickness_empty_string.dcm",)  # in nibabel/nicom/tests/data
HELD_OUT_EPI_SLICES = (2, 6, 10, 14, 18, 22)
HELD_OUT_ANATOMICAL_SLICES = (6, 9, 15, 18)
HELD_OUT_EPI_CENTRES = (12,)
HELD_OUT_ANATOMICAL_STACKS = 2


def held_out_slices() -> list[Slice]:
    """Real slices no pipeline step reads (``HELD_OUT_*``): 11 MR slices of three subjects."""
    slices: list[Slice] = []
    nicom = _package_dir("nibabel", "nicom", "tests", "data")
    for name in HELD_OUT_DICOM if nicom is not None else ():
        try:
            slices.append(read_dicom(nicom / name))
        except (ImageError, DataSourceError) as exc:
            warnings.warn(f"skipping held-out {name}: {exc.args[0]}", stacklevel=2)
    nifti = _package_dir("nibabel", "tests", "data")
    if nifti is not None:
        epi = read_nifti(nifti / "example4d.nii.gz")
        anatomical = read_nifti(nifti / "anatomical.nii")
        slices += [epi[z] for z in HELD_OUT_EPI_SLICES]
        slices += [anatomical[z] for z in HELD_OUT_ANATOMICAL_SLICES]
    if not slices:
        raise DataSourceError("no held-out slices: nibabel is not installed", DATA_HINT)
    return slices


def held_out_stacks(depth: int) -> list[list[Slice]]:
    """Stacks of ``depth`` adjacent slices no depth-model pipeline step reads (``HELD_OUT_*``)."""
    nifti = _package_dir("nibabel", "tests", "data")
    if nifti is None:
        raise DataSourceError("held-out stacks need nibabel, which is not installed", DATA_HINT)
    anatomical = read_nifti(nifti / "anatomical.nii", "MR")
    centres = evenly_spaced(len(anatomical), HELD_OUT_ANATOMICAL_STACKS)
    epi = bundled_volume()
    return ([anatomical.stack(c, depth) for c in centres]
            + [epi.stack(c, depth) for c in HELD_OUT_EPI_CENTRES])


def bundled_calibration_paths() -> list[Path]:
    """Files for the default calibration set (held out from the bundled validation slices)."""
    paths = []
    dicom = _package_dir("pydicom", "data", "test_files")
    nifti = _package_dir("nibabel", "tests", "data")
    if dicom is not None:
        paths += [dicom / name for name in BUNDLED_CALIBRATION_DICOM if (dicom / name).is_file()]
    if nifti is not None:
        paths += [nifti / name for name in BUNDLED_CALIBRATION_NIFTI if (nifti / name).is_file()]
    if not paths:
        raise DataSourceError("no bundled calibration images (pydicom and nibabel missing)",
                              hint="pip install samedge[data], or pass --data DIR")
    return paths
