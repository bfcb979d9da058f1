"""NIfTI volumes through nibabel's lazy proxy: one slice read per access."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samedge.data.formats import FORMATS_HINT, require_module
from samedge.data.geometry import nifti_geometry, nifti_reverses_k
from samedge.data.slices import Slice, Volume
from samedge.data.windows import Window, to_uint8
from samedge.errors import DataSourceError, ImageError


def read_nifti(
    path: str | Path, modality: str = "MR", window: Window | None = None, frame: int | None = 0
) -> Volume:
    """Slices along the last spatial axis through nibabel's lazy proxy (which applies scl_slope
    and scl_inter), from low to high world coordinate, each laid out rows = second voxel axis as
    in SimpleITK's arrays, which MedSAM's preprocessing used. 4-D files give volume ``frame``;
    ``frame=None`` refuses a 4-D file of several volumes instead of picking one silently."""
    nib = require_module("nibabel")
    path = Path(path)
    try:
        img = nib.load(path)
    except Exception as exc:  # ImageFileError, OSError, EOFError, zlib.error...
        raise ImageError(f"cannot read NIfTI file {path}: {exc}", hint=FORMATS_HINT) from exc
    shape = img.shape
    if len(shape) not in (3, 4):
        raise DataSourceError(f"{path.name} has shape {shape}, not 3-D or 4-D", hint="one volume")
    frames = shape[3] if len(shape) == 4 else 1
    if frame is None and frames > 1:
        raise DataSourceError(f"{path.name} is 4-D: it holds {frames} volumes",
                              hint=f"choose one with --frame 0..{frames - 1}")
    frame = frame or 0
    if not 0 <= frame < frames:
        raise DataSourceError(f"{path.name}: frame={frame} out of range", f"use 0..{frames - 1}")
    reverse = nifti_reverses_k(img.affine)
    depth, proxy, time = shape[2], img.dataobj, (frame,) if len(shape) == 4 else ()

    def read(i: int) -> Slice:
        z = depth - 1 - i if reverse else i
        data = np.asarray(proxy[(slice(None), slice(None), z, *time)]).T
        return Slice(to_uint8(data, modality, window), f"{path.name}[z={z}]", modality, source=path)

    return Volume(path.name, modality, depth, read, path, geometry=lambda: nifti_geometry(img))

