"""Open any supported path as a slice or a volume, and cut depth stacks from volumes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from samedge.data.dicom import (
    dcmread,
    frame_count,
    read_dicom,
    read_dicom_frames,
    read_dicom_series,
    series_volume,
)
from samedge.data.formats import FORMATS_HINT, file_kind
from samedge.data.images import read_image_file, read_npz
from samedge.data.nifti import read_nifti
from samedge.data.slices import Slice, Volume, evenly_spaced
from samedge.data.windows import Window
from samedge.errors import DataSourceError, ImageError, StackDepthError


def open_source(
    path: str | Path, window: Window | None = None, modality: str | None = None,
    frame: int | None = 0,
) -> Slice | Volume:
    """Open any supported file or DICOM folder; volumes come back unread (headers only).
    ``frame``: the volume of a 4-D NIfTI (None: refuse one with several)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path} does not exist", hint="check the path")
    kind = file_kind(path)
    if kind == "series":
        return read_dicom_series(path, window=window)
    if kind == "nifti":
        return read_nifti(path, modality or "MR", window, frame)
    if kind == "npz":
        return read_npz(path, modality or "OT", window)
    if kind == "image":
        return read_image_file(path, modality or "OT", window)
    if kind == "dicom" and frame_count(dcmread(path, header_only=True)) > 1:
        return read_dicom_frames(path, window)
    if kind == "dicom":
        return read_dicom(path, window)
    raise ImageError(f"{path.name}: unsupported file type", hint=FORMATS_HINT)


def load_image(
    path: str | Path,
    slice_index: int | None = None,
    window: Window | None = None,
    modality: str | None = None,
    frame: int | None = 0,
) -> Slice:
    """One slice for ``predict``: the given slice of a volume, its middle slice by default."""
    source = open_source(path, window, modality, frame)
    if isinstance(source, Slice):
        if slice_index not in (None, 0):
            raise ImageError(f"{source.name} is a single image, it has no slice {slice_index}",
                             hint="drop slice_index")
        return source
    index = len(source) // 2 if slice_index is None else slice_index
    if not -len(source) <= index < len(source):
        raise ImageError(f"slice_index={index} out of range for {source.name}",
                         hint=f"use 0..{len(source) - 1}")
    return source[index]


STACK_HINT = "pass a volume: a DICOM series folder, a NIfTI file or a multi-frame DICOM"


def open_volume(path: str | Path, window: Window | None = None,
                modality: str | None = None, frame: int | None = 0) -> Volume:
    """A volume for a depth model; a single 2-D image is a StackDepthError (it makes no stack)."""
    source = open_source(path, window, modality, frame)
    if isinstance(source, Slice):
        raise StackDepthError(
            f"{Path(path).name} is a single 2-D image; this model's encoder takes a stack of "
            "adjacent slices", hint=STACK_HINT)
    return source


def _check_depth(volume: Volume, depth: int) -> None:
    if len(volume) < depth:
        raise StackDepthError(
            f"{volume.name} has {len(volume)} slice(s); this model's encoder takes a stack of "
            f"{depth} adjacent slices", hint=f"{STACK_HINT} with at least {depth} slices")


def volume_stack(volume: Volume, depth: int, centre: int | None = None) -> list[Slice]:
    """The ``depth`` adjacent slices around ``centre`` (the middle slice by default), edges
    replicated as MA-SAM pads the volume ends. A volume with fewer than ``depth`` slices is a
    StackDepthError: replicating most of a stack would feed the model a volume it never saw."""
    _check_depth(volume, depth)
    index = len(volume) // 2 if centre is None else centre
    if not -len(volume) <= index < len(volume):
        raise ImageError(f"slice {index} out of range for {volume.name} ({len(volume)} slices)",
                         hint=f"use 0..{len(volume) - 1}")
    return volume.stack(index, depth)


def read_stacks(paths: Iterable[str | Path], depth: int, per_volume: int = 2,
                window: Window | None = None) -> list[list[Slice]]:
    """Validation stacks for a depth model: ``per_volume`` stacks of ``depth`` adjacent slices
    spread evenly along each volume (DICOM series folder, NIfTI, multi-frame DICOM, (D, H, W)
    npz). Single-frame DICOM files given one by one (``scans/*.dcm``) are grouped into their
    series and ordered along the slice normal; a lone 2-D image is a StackDepthError."""
    volumes: list[Volume] = []
    series: dict[tuple[Path, str], list[tuple[Path, Any]]] = defaultdict(list)
    for path in map(Path, paths):
        if path.is_file() and file_kind(path) == "dicom":
            header = dcmread(path, header_only=True)
            if frame_count(header) == 1 and "Rows" in header:
                uid = str(header.get("SeriesInstanceUID") or "")
                series[(path.parent, uid)].append((path, header))
                continue
        volumes.append(open_volume(path, window))
    for (folder, _), items in series.items():
        if len(items) == 1:
            volumes.append(open_volume(items[0][0], window))  # raises: one slice is no stack
        else:
            volumes.append(series_volume(folder, items, window))
    if not volumes:
        raise DataSourceError("no validation volumes given", hint=STACK_HINT)
    stacks = []
    for volume in volumes:
        _check_depth(volume, depth)
        centres = sorted(set(evenly_spaced(len(volume), min(per_volume, len(volume)))))
        stacks += [volume_stack(volume, depth, centre) for centre in centres]
    return stacks
