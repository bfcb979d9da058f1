"""Where the voxels of a volume lie, and how a reader's slices map back to the file's voxels.

Readers hand out slice ``n`` of a volume as a display image ``[row, column]``. A segmentation
of those slices is only useful if it goes back to exactly the voxels it was computed on, so
each volume reader records a :class:`Geometry`: the stored voxel grid (shape, affine, NIfTI
header or DICOM files) and the one mapping between it and the slices.

Conventions (the command line's coordinates are these voxel indices):

* NIfTI: ``x, y, z`` are nibabel's array indices ``i, j, k`` in the file's stored order,
  whatever the affine. The reader shows voxel ``(i, j, k)`` at ``[row j, column i]`` of slice
  ``n = k``, or ``n = K - 1 - k`` when the affine's third axis points from high to low world
  coordinate (it orders slices from low to high).
* DICOM series: ``x`` = column, ``y`` = row, ``z`` = the slice's index after sorting by
  ImagePositionPatient along the slice normal (never file name or InstanceNumber).
  The affine maps ``(column, row, index)`` to RAS+ millimetres like nibabel's, so a series
  written out as NIfTI has that voxel order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samedge.errors import DataSourceError, PromptError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient frame → NIfTI's
ORIENTATION_TOLERANCE = 1e-4  # direction cosines of one series must agree to this
GRID_TOLERANCE = 0.1  # a slice may sit this fraction of the spacing off the regular grid


@dataclass(frozen=True, eq=False)
class Geometry:
    """The stored voxel grid of a volume: ``shape`` (I, J, K) = (columns, rows, slices) and
    ``affine`` mapping stored voxel indices (i, j, k) to RAS+ mm; ``reversed_k`` when slice
    ``n`` of the reader is stored ``k = K - 1 - n``. A NIfTI source keeps its ``header`` (so
    output keeps qform/sform and their codes), a DICOM series its ``files`` in slice order."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    reversed_k: bool = False
    header: Any = None
    files: tuple[Path, ...] = ()

    @property
    def kind(self) -> str:
        return "nifti" if self.header is not None else "dicom"

    @property
    def slices(self) -> int:
        return self.shape[2]

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.shape[1], self.shape[0]

    def slice_of(self, k: int) -> int:
        """The reader's slice index of stored index ``k`` (its own inverse)."""
        return self.shape[2] - 1 - k if self.reversed_k else k

    def to_stored(self, volume: np.ndarray) -> np.ndarray:
        """(N, H, W) in slice order → (I, J, K) in the file's stored voxel order."""
        if volume.shape != (self.shape[2], *self.image_hw):
            raise DataSourceError(f"volume of shape {volume.shape} does not fit the grid "
                                  f"{self.shape} (expected (slices, rows, columns))")
        stored = np.transpose(volume, (2, 1, 0))
        return np.ascontiguousarray(stored[:, :, ::-1] if self.reversed_k else stored)

    def from_stored(self, array: np.ndarray) -> np.ndarray:
        """(I, J, K) in stored order → (N, H, W) in slice order (inverse of ``to_stored``)."""
        if array.shape[:3] != self.shape:
            raise DataSourceError(f"array of shape {array.shape} is not the grid {self.shape}")
        ordered = array[:, :, ::-1] if self.reversed_k else array
        return np.ascontiguousarray(np.transpose(ordered, (2, 1, 0)))

    def slice_box(self, box3d: Sequence[float]) -> tuple[float, float, int, float, float, int]:
        """A 3-D box ``x0, y0, z0, x1, y1, z1`` in voxel indices (inclusive) → the same box with
        z as slice indices ``n0 <= n1``; a box reaching outside the volume is a PromptError."""
        x0, y0, z0, x1, y1, z1 = (float(v) for v in box3d)
        self._check_voxel((x0, y0, z0), "box corner")
        self._check_voxel((x1, y1, z1), "box corner")
        if x1 < x0 or y1 < y0 or z1 < z0:
            raise PromptError(f"3-D box {list(box3d)} has x1 < x0, y1 < y0 or z1 < z0",
                              hint="give x0,y0,z0,x1,y1,z1 with the low corner first")
        n0, n1 = sorted((self.slice_of(int(z0)), self.slice_of(int(z1))))
        return x0, y0, n0, x1, y1, n1

    def slice_point(self, point: Sequence[float]) -> tuple[float, float, int]:
        """A voxel ``x, y, z`` → ``x, y`` and the slice index of ``z``."""
        x, y, z = (float(v) for v in point)
        self._check_voxel((x, y, z), "point")
        return x, y, self.slice_of(int(z))

    def _check_voxel(self, xyz: tuple[float, float, float], what: str) -> None:
        limits = self.shape
        if any(not np.isfinite(v) or v < 0 or v > n - 1 for v, n in zip(xyz, limits)):
            raise PromptError(
                f"{what} {tuple(v for v in xyz)} lies outside the volume's voxel grid "
                f"x 0..{limits[0] - 1}, y 0..{limits[1] - 1}, z 0..{limits[2] - 1}",
                hint="coordinates are voxel indices (NIfTI: i, j, k in stored order; DICOM: "
                     "column, row, slice index sorted along the normal)")
        if xyz[2] != int(xyz[2]):
            raise PromptError(f"{what} z = {xyz[2]} is not a slice index",
                              hint="z is a whole voxel index")


def nifti_reverses_k(affine: np.ndarray) -> bool:
    """Whether the stored third axis runs from high to low world coordinate (read_nifti then
    hands slices out in reverse, low to high)."""
    import nibabel as nib

    return bool(nib.io_orientation(affine)[2, 1] < 0)


def nifti_geometry(image: Any) -> Geometry:
    """A nibabel image's grid: its best affine (sform, else qform) and a copy of its header."""
    return Geometry(tuple(int(n) for n in image.shape[:3]), np.asarray(image.affine, float),
                    nifti_reverses_k(image.affine), header=image.header.copy())


def _vector(header: Any, name: str, size: int, where: str) -> np.ndarray:
    value = header.get(name)
    if value is None or len(value) != size:
        raise DataSourceError(f"{where}: {name} missing or malformed; a segmentation cannot be "
                              "placed without it", hint="re-export the series with its geometry")
    return np.asarray([float(v) for v in value])


def dicom_geometry(headers: Sequence[Any], files: Sequence[Path]) -> Geometry:
    """The grid of a DICOM series whose ``headers`` are sorted along the slice normal.

    Every slice must share one orientation and pixel spacing and sit on one regular grid
    (within ``GRID_TOLERANCE`` of the spacing): otherwise one affine would place some slices
    wrongly, and a mask one slice off is worse than none.
    """
    where = f"DICOM series in {Path(files[0]).parent}" if files else "DICOM series"
    orientation = _vector(headers[0], "ImageOrientationPatient", 6, where)
    spacing = _vector(headers[0], "PixelSpacing", 2, where)
    positions = np.array([_vector(h, "ImagePositionPatient", 3, where) for h in headers])
    for header, path in zip(headers, files):
        other = _vector(header, "ImageOrientationPatient", 6, where)
        if np.abs(other - orientation).max() > ORIENTATION_TOLERANCE:
            raise DataSourceError(
                f"{where}: {Path(path).name} has orientation {other.tolist()}, the first slice "
                f"{orientation.tolist()}: the series is not one volume",
                hint="keep only the slices of one acquisition (one orientation)")
        if np.abs(_vector(header, "PixelSpacing", 2, where) - spacing).max() > 1e-6:
            raise DataSourceError(f"{where}: {Path(path).name} has another PixelSpacing",
                                  hint="keep only the slices of one acquisition")
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    if len(headers) > 1:
        step = (positions[-1] - positions[0]) / (len(headers) - 1)
        expected = positions[0] + np.arange(len(headers))[:, None] * step
        off = np.linalg.norm(positions - expected, axis=1)
        worst = int(off.argmax())
        if off[worst] > GRID_TOLERANCE * np.linalg.norm(step):
            raise DataSourceError(
                f"{where}: slice spacing is irregular ({Path(files[worst]).name} lies "
                f"{off[worst]:.3f} mm off the regular grid of step {np.linalg.norm(step):.3f} mm)",
                hint="segment a series with uniform spacing (resample it first)")
    else:
        thickness = headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness")
        step = normal * float(thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * spacing[1]  # along a row: the column index i grows
    lps[:3, 1] = column_cosine * spacing[0]  # down a column: the row index j grows
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    shape = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
    return Geometry(shape, LPS_TO_RAS @ lps, files=tuple(Path(f) for f in files))
