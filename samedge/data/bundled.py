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


# Real medical images shipped inside pydicom and nibabel that are *not* among
# ``bundled_slices()`` (the default validation set): calibration on them keeps validation held out.
# NM, ultrasound (single and 30 frames), MR volumes; other slices of the validation MR volumes.
BUNDLED_CALIBRATION_DICOM = (
    "JPEG2000.dcm", "examples_jpeg2k.dcm", "examples_ybr_color.dcm", "examples_rgb_color.dcm",
    "examples_palette.dcm", "image_dfl.dcm",
)
BUNDLED_CALIBRATION_NIFTI = (
    "example4d.nii.gz", "anatomical.nii", "example_nifti2.nii.gz", "reoriented_anat_moved.nii",
)


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
