"""Synthetic volumes with known ground truth for the volume tests and benchmark: an ellipsoid in
noise on a non-unit, oblique or flipped grid, and the same volume as a DICOM CT series."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SPACING = (0.8, 0.7, 2.5)  # mm along i, j, k


def affine(kind: str, spacing=SPACING) -> np.ndarray:
    """``identity`` (unit grid), ``scaled``, ``flipped`` (k runs towards the feet, i to the
    right), or ``oblique`` (rotated 20° about x and 10° about z, k flipped)."""
    scale = np.diag([*spacing, 1.0])
    if kind == "identity":
        return np.eye(4)
    if kind == "scaled":
        out = scale.copy()
    elif kind == "flipped":
        out = np.diag([-1.0, 1.0, -1.0, 1.0]) @ scale
    elif kind == "oblique":
        a, b = np.radians(20.0), np.radians(10.0)
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
        out = np.eye(4)
        out[:3, :3] = rz @ rx @ np.diag([1.0, 1.0, -1.0]) @ np.diag(spacing)
    else:
        raise ValueError(kind)
    out[:3, 3] = [-30.5, 12.25, 40.0]
    return out


def ellipsoid(shape=(72, 64, 9), centre=(40.0, 30.0, 4.6), radii=(17.0, 13.0, 3.3),
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU-like data, bool ground truth), both (I, J, K): a bright ellipsoid (200) in
    Gaussian noise around 40; off-centre so a mirrored or shifted mask misses it."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    truth = (((grid - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0
    rng = np.random.default_rng(seed)
    data = rng.normal(40.0, 12.0, shape) + 160.0 * truth
    return np.rint(data).astype(np.int16), truth


def truth_box(truth: np.ndarray) -> tuple[int, ...]:
    """The ground truth's 3-D box x0, y0, z0, x1, y1, z1 in voxel indices (inclusive)."""
    idx = np.argwhere(truth)
    return (*idx.min(0).tolist(), *idx.max(0).tolist())


def write_nifti(path: Path, data: np.ndarray, grid: np.ndarray, qform_code: int = 1,
                sform_code: int = 2) -> Path:
    image = nib.Nifti1Image(data, grid)
    image.set_qform(grid, code=qform_code)
    image.set_sform(grid, code=sform_code)
    nib.save(image, path)
    return path


def nifti_to_series(nifti: Path, folder: Path) -> Path:
    """The NIfTI volume as a CT series: pixel (row j, column i) of instance k = voxel (i, j, k),
    positions and orientation from the affine (RAS → LPS), files named against their order."""
    image = nib.load(nifti)
    data, grid = np.asarray(image.dataobj), image.affine
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    orientation = np.concatenate([lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]])
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^P", "", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study, "1", ""
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.FrameOfReferenceUID = series, 1, frame
        ds.Modality, ds.Manufacturer, ds.InstanceNumber = "CT", "samedge-test", data.shape[2] - k
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing, column spacing
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / f"slice{(7 * k) % data.shape[2]:03d}_{k}.dcm",
                   enforce_file_format=True)
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
