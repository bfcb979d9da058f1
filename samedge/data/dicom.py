"""DICOM: single images, multi-frame files and series ordered along the slice normal.

Stored values go through the modality LUT to HU before windowing, so CT is scaled as the
adaptations were trained; a missing or duplicated slice in a series is an error, never a
silently shorter volume.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from samedge.data.formats import (
    DECODER_HINT,
    FORMATS_HINT,
    file_kind,
    require_module,
    visible_files,
)
from samedge.data.geometry import dicom_geometry
from samedge.data.slices import Slice, Volume
from samedge.data.windows import Window, to_uint8
from samedge.errors import DataSourceError, ImageError


def dcmread(path: Path, header_only: bool = False) -> Any:
    pydicom = require_module("pydicom")
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except Exception as exc:  # pydicom raises many types for truncated or foreign files
        raise ImageError(
            f"cannot read DICOM file {path}: {exc}", hint="check that it is a complete DICOM file"
        ) from exc


def frame_count(header: Any) -> int:
    return int(header.get("NumberOfFrames") or 1)


def _rescale_header(ds: Any, frame: int | None) -> Any:
    """The dataset holding slope/intercept: enhanced multi-frame files keep them in functional
    groups, where pydicom's modality LUT does not look."""
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return ds
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups = [per_frame[frame]] if frame is not None and frame < len(per_frame) else []
    for group in groups + list(ds.get("SharedFunctionalGroupsSequence") or []):
        if group.get("PixelValueTransformationSequence"):
            return group.PixelValueTransformationSequence[0]
    return ds


def _dicom_slice(
    pixels: np.ndarray, ds: Any, name: str, path: Path, window: Window | None, frame: int | None
) -> Slice:
    """Stored values -> HU (modality LUT) -> window or percentiles; colour stays colour.

    pydicom already converts YBR to RGB when decoding, so 3-sample data is RGB here.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    modality = str(ds.get("Modality") or "OT")
    interpretation = str(ds.get("PhotometricInterpretation") or "MONOCHROME2")
    if interpretation == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        image = rgb if rgb.dtype == np.uint8 else np.rint(rgb / 257.0).astype(np.uint8)
    elif pixels.ndim == 3:
        image = to_uint8(pixels, modality)
    else:
        image = to_uint8(apply_modality_lut(pixels, _rescale_header(ds, frame)), modality, window)
        image = 255 - image if interpretation == "MONOCHROME1" else image
    return Slice(image, name, modality, source=path)


def _decode_error(path: Path, ds: Any, exc: Exception) -> ImageError:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    encoding = getattr(syntax, "name", "unknown transfer syntax")
    # Uncompressed pixels need no decoder: failing to read them means the file is damaged.
    hint = (DECODER_HINT if getattr(syntax, "is_compressed", True) else
            "its pixel data is shorter than its header says: the file is truncated or damaged; "
            "copy it again from the archive")
    return ImageError(f"cannot decode pixels of {path.name} ({encoding}): {exc}", hint)


def read_dicom(path: str | Path, window: Window | None = None) -> Slice:
    """One single-frame DICOM image; multi-frame files go through :func:`read_dicom_frames`."""
    path = Path(path)
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise ImageError(f"{path.name} holds no Pixel Data", hint="pass an image, not a report")
    if frame_count(ds) > 1:
        raise ImageError(
            f"{path.name} has {frame_count(ds)} frames",
            hint="use read_dicom_frames, or load_image(path, slice_index=...)",
        )
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # missing or failing decoder plugin
        raise _decode_error(path, ds, exc) from exc
    return _dicom_slice(pixels, ds, path.name, path, window, None)


def read_dicom_frames(path: str | Path, window: Window | None = None) -> Volume:
    """A multi-frame DICOM file as a Volume in stored frame order; each access decodes one frame."""
    from pydicom.pixels import pixel_array

    path = Path(path)
    header = dcmread(path, header_only=True)

    def read(i: int) -> Slice:
        try:
            pixels = pixel_array(path, index=i)
        except Exception as exc:
            raise _decode_error(path, header, exc) from exc
        return _dicom_slice(pixels, header, f"{path.name}[frame={i}]", path, window, i)

    modality = str(header.get("Modality") or "OT")
    return Volume(path.name, modality, frame_count(header), read, path)


def _slice_positions(headers: list[Any]) -> np.ndarray | None:
    """Position along the slice normal (row x column direction), else InstanceNumber, else None."""
    if all("ImagePositionPatient" in h and "ImageOrientationPatient" in h for h in headers):
        orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        return np.array([np.dot(np.array(h.ImagePositionPatient, float), normal) for h in headers])
    if all(h.get("InstanceNumber") is not None for h in headers):
        return np.array([float(h.InstanceNumber) for h in headers])
    return None


def _check_spacing(files: list[Path], positions: np.ndarray, where: str) -> None:
    """Duplicate positions or a step > 1.5x the median spacing mean the series is incomplete."""
    steps = np.diff(positions)
    if steps.size == 0:
        return
    median = float(np.median(steps))
    duplicate = np.flatnonzero(steps <= max(0.01 * median, 1e-4))
    if duplicate.size:
        i = int(duplicate[0])
        raise DataSourceError(
            f"{where}: {files[i].name} and {files[i + 1].name} lie at the same position "
            f"({positions[i]:.3f})",
            hint="remove duplicated instances, or split series that share one SeriesInstanceUID",
        )
    gaps = np.flatnonzero(steps > 1.5 * median)
    if gaps.size:
        i = int(gaps[0])
        raise DataSourceError(
            f"{where}: gap of {steps[i]:.3f} between {files[i].name} (at {positions[i]:.3f}) and "
            f"{files[i + 1].name} (at {positions[i + 1]:.3f}), median spacing {median:.3f}: "
            f"about {max(round(steps[i] / median) - 1, 1)} slice(s) missing",
            hint="copy the complete series (every instance of its SeriesInstanceUID) there",
        )


def read_dicom_series(
    folder: str | Path, series_uid: str | None = None, window: Window | None = None
) -> Volume:
    """One DICOM series from a folder, ordered along the slice normal; pixels are read on access.

    Only headers are read here, so opening a 500-slice CT is cheap and a missing or duplicated
    slice is reported before anything is calibrated on a silently broken volume.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataSourceError(f"{folder} is not a folder", hint="pass the folder of the .dcm files")
    series: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    unreadable = []
    for path in (p for p in visible_files(folder) if file_kind(p) == "dicom"):
        try:
            header = dcmread(path, header_only=True)
        except ImageError:
            unreadable.append(path.name)
            continue
        if "Rows" in header:  # skips DICOMDIR, reports and structure sets
            series[str(header.get("SeriesInstanceUID") or "")].append((path, header))
    skipped = f"{len(unreadable)} unreadable DICOM file(s): {', '.join(unreadable[:5])}"
    if not series:
        detail = f" ({skipped})" if unreadable else ""
        raise DataSourceError(f"no readable DICOM images in {folder}{detail}", hint=FORMATS_HINT)
    if unreadable:
        warnings.warn(f"{folder}: skipped {skipped}", stacklevel=2)
    if series_uid is None and len(series) > 1:
        listing = "; ".join(
            f"{uid} ({len(items)} files, {items[0][1].get('SeriesDescription') or 'undescribed'})"
            for uid, items in series.items()
        )
        raise DataSourceError(
            f"{folder} mixes {len(series)} DICOM series: {listing}",
            hint="pass series_uid=..., or put each series in its own folder",
        )
    uid = next(iter(series)) if series_uid is None else series_uid
    if uid not in series:
        available = f"use one of {', '.join(series)}"
        raise DataSourceError(f"series {uid} not found in {folder}", available)
    return series_volume(folder, series[uid], window)


def series_volume(folder: Path, items: list[tuple[Path, Any]], window: Window | None) -> Volume:
    if len(items) == 1 and frame_count(items[0][1]) > 1:
        return read_dicom_frames(items[0][0], window)
    sizes = {(int(h.Rows), int(h.Columns)) for _, h in items}
    if len(sizes) > 1:
        raise DataSourceError(
            f"{folder}: one series with image sizes {sorted(sizes)}",
            hint="keep only the slices of one acquisition",
        )
    positions = _slice_positions([h for _, h in items])
    if positions is None and len(items) > 1:
        raise DataSourceError(
            f"{folder}: no ImagePosition/OrientationPatient or InstanceNumber to order slices by",
            hint="re-export the series with its geometry tags",
        )
    order = np.argsort(positions, kind="stable") if positions is not None else [0]
    files = [items[i][0] for i in order]
    if positions is not None:
        _check_spacing(files, positions[order], f"DICOM series in {folder}")
    modality = str(items[0][1].get("Modality") or "OT")
    headers = [items[i][1] for i in order]
    return Volume(folder.name, modality, len(files), lambda i: read_dicom(files[i], window), folder,
                  geometry=lambda: dicom_geometry(headers, files))

