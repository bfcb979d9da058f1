"""Segmentation volumes out: NIfTI on the input's exact grid, DICOM-SEG referencing the source
series (through highdicom). Both are written atomically: a temp file beside the target,
fsynced, then renamed over it, so a crash never leaves a half-written mask that looks whole.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from samedge.data.formats import require_module
from samedge.data.geometry import Geometry
from samedge.errors import DataSourceError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIFTI_INTENT_LABEL = "label"  # NIFTI_INTENT_LABEL (1002): voxel values are class indices


def label_dtype(labels: np.ndarray) -> np.dtype:
    """The smallest unsigned type that holds the labels (uint8 up to 255 classes)."""
    top = int(labels.max()) if labels.size else 0
    return np.dtype(np.uint8 if top < 256 else np.uint16)


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``target`` (same suffix, for writers that read it) that replaces
    ``target`` in one rename once the block succeeds; removed if it fails."""
    target = Path(target)
    if not target.parent.is_dir():
        raise DataSourceError(f"cannot write {target}: {target.parent} is not a folder",
                              hint="create the output folder first")
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    suffix = next((s for s in NIFTI_SUFFIXES[::-1] if name.endswith(s)), None)
    if suffix is None:
        raise DataSourceError(f"{path.name}: a NIfTI output ends in .nii or .nii.gz",
                              hint="name the output e.g. seg.nii.gz, or use --format dicom-seg")
    return suffix


def write_nifti(labels: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Labels (N, H, W) in slice order → NIfTI of the source's shape, voxel order and affine.

    From a NIfTI source the header is the source's (qform and sform with their codes, units,
    NIfTI-1 or -2), with the data type, scaling and intent of a label map; from a DICOM series
    the affine is the series' (RAS+, voxel order column, row, sorted slice), codes 1 (scanner).
    """
    nib = require_module("nibabel")
    path = Path(path)
    suffix = nifti_suffix(path)
    stored = geometry.to_stored(np.asarray(labels))
    stored = stored.astype(label_dtype(stored))
    if geometry.header is not None:
        header = geometry.header.copy()
        kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        image = kind(stored, None, header)
        image.set_qform(*geometry.header.get_qform(coded=True))
        image.set_sform(*geometry.header.get_sform(coded=True))
    else:
        image = nib.Nifti1Image(stored, geometry.affine)
        image.set_qform(geometry.affine, code=1)
        image.set_sform(geometry.affine, code=1)
        image.header.set_xyzt_units("mm")
    image.header.set_data_dtype(stored.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header.set_intent(NIFTI_INTENT_LABEL)
    image.header["cal_min"], image.header["cal_max"] = 0, max(int(stored.max()), 1)
    image.header["descrip"] = b"samedge segmentation"
    with atomic_path(path, suffix) as temp:
        nib.save(image, temp)
    return path


def write_dicom_seg(labels: np.ndarray, geometry: Geometry, path: str | Path,
                    names: Sequence[str], family: str = "samedge",
                    version: str = "0") -> Path:
    """Labels (N, H, W) in slice order → a DICOM Segmentation (binary, one segment per class
    ``1..len(names)``) that references every image of the source series, through highdicom.

    Frames follow the sorted source images, so each mask frame is tied to the SOP instance
    it was computed on, not to a position guessed again by the reader.
    """
    if geometry.kind != "dicom":
        raise DataSourceError("a DICOM-SEG references the source DICOM series; this input is "
                              "NIfTI", hint="use --format nifti for NIfTI inputs")
    hd = require_module("highdicom")
    pydicom = require_module("pydicom")
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in geometry.files]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=family, version=version, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for number, name in enumerate(names, start=1)]
    array = np.asarray(labels)
    if array.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise DataSourceError(f"labels of shape {array.shape} do not fit the {len(sources)} "
                              "source images")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=array.astype(label_dtype(array)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="samedge", manufacturer_model_name=family[:64],
        software_versions=version, device_serial_number="0",
        series_description="samedge segmentation", omit_empty_frames=False)
    with atomic_path(Path(path), ".dcm") as temp:
        seg.save_as(temp)
    return Path(path)
