"""Readers that turn DICOM, NIfTI, PNG/JPEG/TIFF and npz files into display-ready slices.

Calibration (int8 quantization) and validation both need real medical slices mapped to 8-bit RGB
exactly as the models saw them in training, sampled across patients rather than from neighbouring
slices of one scan, and read lazily so that hundreds of calibration slices never sit in memory at
once. Volumes are therefore opened from headers only and read one slice at a time on access.
"""

from __future__ import annotations

import importlib
import importlib.util
import operator
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samedge.calibration.windows import Window, parse_window, to_uint8
from samedge.errors import DataSourceError, ImageError, StackDepthError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGE_KEYS = ("image", "imgs", "img")
MASK_KEYS = ("mask", "gts", "label")
BOX_KEYS = ("box", "boxes")
DATA_HINT = "install the medical readers: pip install samedge[data]"
FORMATS_HINT = "use a DICOM file or series folder, .nii/.nii.gz, .npz, or PNG/JPEG/BMP/TIFF images"
DECODER_HINT = "install a decoder: pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"
BUNDLED_DICOM = (
    "CT_small.dcm",
    "MR_small.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "examples_overlay.dcm",
)
BUNDLED_EPI_SLICES = 3


@dataclass(frozen=True)
class Slice:
    """One display-ready 2-D image with its optional ground truth, as every model consumes it."""

    image: np.ndarray  # uint8 (H, W, 3)
    name: str
    modality: str = "OT"
    mask: np.ndarray | None = None  # (H, W) label map
    box: np.ndarray | None = None  # (4,) float x0, y0, x1, y1 in pixels
    source: Path | None = None

    def __post_init__(self) -> None:
        image, hint = self.image, "give the mask the image's height and width and one box of 4"
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"{self.name}: not uint8 (H, W, 3) but {image.dtype} {image.shape}")
        if self.mask is not None and self.mask.shape != image.shape[:2]:
            raise ImageError(
                f"{self.name}: mask shape {self.mask.shape} is not the image's {image.shape[:2]}",
                hint,
            )
        if self.box is not None and np.shape(self.box) != (4,):
            raise ImageError(f"{self.name}: box has shape {np.shape(self.box)}, not (4,)", hint)


class Volume:
    """Slices in anatomical order, each read from disk only when indexed."""

    def __init__(
        self,
        name: str,
        modality: str,
        length: int,
        read: Callable[[int], Slice],
        source: Path | None = None,
    ):
        self.name, self.modality, self.source = name, modality, source
        self._length, self._read = length, read

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Slice:
        return self._read(self._position(index))

    def stack(self, center: int, depth: int = 5) -> list[Slice]:
        """``depth`` slices around ``center``, edges replicated (MA-SAM's i-2..i+2 input)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        first = self._position(center) - depth // 2
        indices = [min(max(i, 0), self._length - 1) for i in range(first, first + depth)]
        read = {i: self._read(i) for i in sorted(set(indices))}
        return [read[i] for i in indices]

    def _position(self, index: int) -> int:
        i = operator.index(index)
        i = i + self._length if i < 0 else i
        if not 0 <= i < self._length:
            raise IndexError(f"slice {index} out of range for {self.name} ({self._length} slices)")
        return i

    def __repr__(self) -> str:
        return f"Volume({self.name!r}, modality={self.modality!r}, slices={self._length})"


# --- DICOM ---------------------------------------------------------------------------------------


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataSourceError(f"reading this data needs {module}", DATA_HINT) from exc


def _dcmread(path: Path, header_only: bool = False) -> Any:
    pydicom = _require("pydicom")
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except Exception as exc:  # pydicom raises many types for truncated or foreign files
        raise ImageError(
            f"cannot read DICOM file {path}: {exc}", hint="check that it is a complete DICOM file"
        ) from exc


def _frame_count(header: Any) -> int:
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
    ds = _dcmread(path)
    if "PixelData" not in ds:
        raise ImageError(f"{path.name} holds no Pixel Data", hint="pass an image, not a report")
    if _frame_count(ds) > 1:
        raise ImageError(
            f"{path.name} has {_frame_count(ds)} frames",
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
    header = _dcmread(path, header_only=True)

    def read(i: int) -> Slice:
        try:
            pixels = pixel_array(path, index=i)
        except Exception as exc:
            raise _decode_error(path, header, exc) from exc
        return _dicom_slice(pixels, header, f"{path.name}[frame={i}]", path, window, i)

    modality = str(header.get("Modality") or "OT")
    return Volume(path.name, modality, _frame_count(header), read, path)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _kind(path: Path) -> str | None:
    """``series``, ``nifti``, ``npz``, ``image`` or ``dicom`` by suffix, or by the DICM preamble."""
    name = path.name.lower()
    if path.is_dir():
        return "series"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npz"):
        return "npz"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    return "dicom" if path.is_file() and _is_dicom(path) else None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


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
    for path in (p for p in _visible(folder) if _kind(p) == "dicom"):
        try:
            header = _dcmread(path, header_only=True)
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
    return _series_volume(folder, series[uid], window)


def _series_volume(folder: Path, items: list[tuple[Path, Any]], window: Window | None) -> Volume:
    if len(items) == 1 and _frame_count(items[0][1]) > 1:
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
    return Volume(folder.name, modality, len(files), lambda i: read_dicom(files[i], window), folder)


# --- NIfTI, images, npz --------------------------------------------------------------------------


def read_nifti(
    path: str | Path, modality: str = "MR", window: Window | None = None, frame: int | None = 0
) -> Volume:
    """Slices along the last spatial axis through nibabel's lazy proxy (which applies scl_slope
    and scl_inter), from low to high world coordinate, each laid out rows = second voxel axis as
    in SimpleITK's arrays, which MedSAM's preprocessing used. 4-D files give volume ``frame``;
    ``frame=None`` refuses a 4-D file of several volumes instead of picking one silently."""
    nib = _require("nibabel")
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
    reverse = nib.io_orientation(img.affine)[2, 1] < 0
    depth, proxy, time = shape[2], img.dataobj, (frame,) if len(shape) == 4 else ()

    def read(i: int) -> Slice:
        z = depth - 1 - i if reverse else i
        data = np.asarray(proxy[(slice(None), slice(None), z, *time)]).T
        return Slice(to_uint8(data, modality, window), f"{path.name}[z={z}]", modality, source=path)

    return Volume(path.name, modality, depth, read, path)


def read_image_file(path: str | Path, modality: str = "OT", window: Window | None = None) -> Slice:
    """PNG/JPEG/BMP/TIFF: 8-bit kept (grey -> 3 channels, RGBA -> RGB), deeper grey scaled."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                pixels = np.asarray(img)
            else:
                pixels = np.asarray(img.convert("L" if img.mode in ("1", "L", "LA") else "RGB"))
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc}", hint=FORMATS_HINT) from exc
    return Slice(to_uint8(pixels, modality, window), path.name, modality, source=path)


def _npz_arrays(path: Path) -> list[np.ndarray | None]:
    """[image, mask, boxes] under their first matching keys."""
    hint = "write it with numpy.savez(path, image=..., mask=..., box=...)"
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read {path}: {exc}", hint) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ImageError(f"{path} is a single .npy array, not an .npz archive", hint)
    with npz:
        found = [next((npz[k] for k in keys if k in npz.files), None)
                 for keys in (IMAGE_KEYS, MASK_KEYS, BOX_KEYS)]
        if found[0] is None:
            raise ImageError(f"{path.name} has no image array (keys: {', '.join(npz.files)})", hint)
    return found


def _npz_slice(
    image: np.ndarray, mask: np.ndarray | None, box: np.ndarray | None, name: str, path: Path,
    modality: str, window: Window | None,
) -> Slice:
    mask = None if mask is None else mask.astype(np.uint8)
    return Slice(to_uint8(image, modality, window), name, modality, mask, box, path)


def read_npz(
    path: str | Path, modality: str = "OT", window: Window | None = None
) -> Slice | Volume:
    """MedSAM-style npz: ``image``/``imgs``/``img``, optional ``mask``/``gts``/``label`` and
    ``box``/``boxes``.

    A 2-D or (H, W, 3) image gives a Slice (first box if several). A (D, H, W) array gives a
    Volume; npz members cannot be read partially, so each access re-reads the file to keep memory
    flat. Its 3-D boxes (N, 6) ``x0, y0, z0, x1, y1, z1`` give each slice the first box spanning it.
    """
    path = Path(path)
    image, mask, boxes = _npz_arrays(path)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4)):
        box = None if boxes is None else np.asarray(boxes, dtype=float).reshape(-1, 4)[0]
        return _npz_slice(image, mask, box, path.name, path, modality, window)
    if image.ndim != 3:
        raise ImageError(f"{path.name}: image has shape {image.shape}", "store (H, W) or (D, H, W)")
    if boxes is not None and np.shape(boxes)[-1] != 6:
        raise ImageError(f"{path.name}: volume boxes have shape {np.shape(boxes)}, not (N, 6)",
                         hint="store x0, y0, z0, x1, y1, z1 per box")

    def read(i: int) -> Slice:
        volume, masks, boxes3d = _npz_arrays(path)
        boxes3d = np.empty((0, 6)) if boxes3d is None else np.asarray(boxes3d, float).reshape(-1, 6)
        spanning = [b[[0, 1, 3, 4]] for b in boxes3d if b[2] <= i <= b[5]]
        mask = None if masks is None else masks[i]
        box = spanning[0] if spanning else None
        return _npz_slice(volume[i], mask, box, f"{path.name}[z={i}]", path, modality, window)

    return Volume(path.name, modality, image.shape[0], read, path)


# --- dispatch ------------------------------------------------------------------------------------


def open_source(
    path: str | Path, window: Window | None = None, modality: str | None = None,
    frame: int | None = 0,
) -> Slice | Volume:
    """Open any supported file or DICOM folder; volumes come back unread (headers only).
    ``frame``: the volume of a 4-D NIfTI (None: refuse one with several)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path} does not exist", hint="check the path")
    kind = _kind(path)
    if kind == "series":
        return read_dicom_series(path, window=window)
    if kind == "nifti":
        return read_nifti(path, modality or "MR", window, frame)
    if kind == "npz":
        return read_npz(path, modality or "OT", window)
    if kind == "image":
        return read_image_file(path, modality or "OT", window)
    if kind == "dicom" and _frame_count(_dcmread(path, header_only=True)) > 1:
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


# --- calibration sampling ------------------------------------------------------------------------


def _lazy_source(path: Path, window: Window | None, modality: str | None) -> Volume:
    """A Volume even for single images, so that their pixels too are read only when sampled."""
    opened = None if _kind(path) == "image" else open_source(path, window, modality)
    if isinstance(opened, Volume):
        return opened
    label = opened.modality if opened is not None else modality or "OT"
    return Volume(path.name, label, 1, lambda _: load_image(path, None, window, modality), path)


def _image_set(
    folder: Path, files: list[Path], window: Window | None, modality: str | None
) -> Volume:
    """A folder of images is one source, so sampling spreads over it as over a volume's slices."""
    label = modality or "OT"

    def read(i: int) -> Slice:
        return read_image_file(files[i], label, window)

    return Volume(folder.name, label, len(files), read, folder)


def _folder_sources(folder: Path, window: Window | None, modality: str | None) -> list[Volume]:
    """DICOM files form one series, images one set, each volume file one source; recurses."""
    kinds = {path: _kind(path) for path in _visible(folder)}
    sources = [read_dicom_series(folder, window=window)] if "dicom" in kinds.values() else []
    images = [path for path, kind in kinds.items() if kind == "image"]
    sources += [_image_set(folder, images, window, modality)] if images else []
    volumes = [path for path, kind in kinds.items() if kind in ("nifti", "npz")]
    sources += [_lazy_source(path, window, modality) for path in volumes]
    for sub in (path for path, kind in kinds.items() if kind == "series"):
        sources += _folder_sources(sub, window, modality)
    return sources


def _evenly_spaced(length: int, count: int, offset: float = 0.5) -> list[int]:
    """``count`` indices over ``length`` slices, one per equal stretch (``offset`` in [0, 1))."""
    return [int((j + offset) * length / count) for j in range(count)]


def _round_robin(lengths: list[int], count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(source, slice) pairs: one slice per source in turn, each source's slices evenly spaced."""
    quotas, remaining = [0] * len(lengths), count
    while remaining and any(q < n for q, n in zip(quotas, lengths)):
        for k, n in enumerate(lengths):
            if remaining and quotas[k] < n:
                quotas[k], remaining = quotas[k] + 1, remaining - 1
    picks = [_evenly_spaced(n, q, rng.random()) for n, q in zip(lengths, quotas)]
    rounds = range(max(quotas))
    return [(k, picks[k][r]) for r in rounds for k in range(len(lengths)) if r < quotas[k]]


def _augment(item: Slice, rng: np.random.Generator) -> Slice:
    """Random horizontal flip and a mild gain/offset, so repeats of scarce data differ."""
    image, mask, box = item.image, item.mask, item.box
    if rng.random() < 0.5:
        width = image.shape[1]
        image = image[:, ::-1]
        mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
        box = None if box is None else np.array([width - box[2], box[1], width - box[0], box[3]])
    jittered = image.astype(np.float32) * rng.uniform(0.9, 1.1) + rng.uniform(-10.0, 10.0)
    image = np.clip(np.rint(jittered), 0, 255).astype(np.uint8)
    return replace(item, image=image, mask=mask, box=box, name=f"{item.name}[aug]")


def iter_calibration_slices(
    paths: str | Path | Iterable[str | Path],
    count: int,
    seed: int = 0,
    window: Window | None = None,
    augment: bool = False,
    modality: str | None = None,
    depth: int = 1,
) -> Iterator[Slice] | Iterator[list[Slice]]:
    """``count`` slices spread across sources and along each volume, read one at a time.

    Sources are opened now (headers only), so bad inputs fail here with DataSourceError; pixels
    are read as the iterator advances. With fewer slices than ``count`` all are yielded with a
    warning or, with ``augment=True``, topped up with flipped/jittered repeats. ``depth`` > 1
    (depth models) yields each picked slice with its neighbours instead: ``depth`` adjacent slices
    of its volume, ends replicated (a lone 2-D image gives its slice ``depth`` times).
    """
    if count < 1:
        raise DataSourceError(f"calibration needs count >= 1, got {count}", hint="pass count >= 1")
    parse_window(window)
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    sources: list[Volume] = []
    for path in map(Path, items):
        if not path.exists():
            raise DataSourceError(f"calibration input {path} does not exist", hint="check the path")
        try:
            if path.is_dir():
                sources += _folder_sources(path, window, modality)
            else:
                sources.append(_lazy_source(path, window, modality))
        except ImageError as exc:
            message = f"calibration input {path} is unusable: {exc.args[0]}"
            raise DataSourceError(message, exc.hint) from exc
    sources = [source for source in sources if len(source)]
    if not sources:
        raise DataSourceError(f"no slices in {', '.join(map(str, items)) or '[]'}", FORMATS_HINT)
    rng = np.random.default_rng(seed)
    sources = [sources[int(k)] for k in rng.permutation(len(sources))]
    plan = [(k, i, False) for k, i in _round_robin([len(s) for s in sources], count, rng)]
    if len(plan) < count and augment:
        repeats = (plan[j % len(plan)] for j in range(count - len(plan)))
        plan += [(k, i, True) for k, i, _ in repeats]
    elif len(plan) < count:
        warnings.warn(
            f"only {len(plan)} calibration slices available, {count} requested; "
            "pass augment=True to top up with augmented repeats",
            stacklevel=2,
        )
    return _read_plan(sources, plan, rng, depth)


def _read_plan(
    sources: list[Volume], plan: list[tuple[int, int, bool]], rng: np.random.Generator,
    depth: int = 1,
) -> Iterator[Slice] | Iterator[list[Slice]]:
    for k, i, augmented in plan:
        try:
            item = sources[k][i] if depth == 1 else sources[k].stack(i, depth)
        except ImageError as exc:
            message = f"calibration slice {i} of {sources[k].name} is unusable: {exc.args[0]}"
            raise DataSourceError(message, exc.hint) from exc
        if not augmented:
            yield item
        elif depth == 1:
            yield _augment(item, rng)
        else:
            yield augment_stack(item, rng)


def augment_stack(stack: Sequence[Slice], rng: np.random.Generator) -> list[Slice]:
    """:func:`_augment` with one draw for the whole stack: adjacent slices must stay alike."""
    seed = int(rng.integers(2**32))
    return [_augment(item, np.random.default_rng(seed)) for item in stack]


# --- bundled real data ---------------------------------------------------------------------------


def _package_dir(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent.joinpath(*parts) if spec is not None and spec.origin else None


def _spread(volume: Volume, count: int) -> list[Slice]:
    return [volume[i] for i in _evenly_spaced(len(volume), count)]


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
    return [volume.stack(centre, depth) for centre in [0, *_evenly_spaced(len(volume), count - 1)]]


# --- stacks for depth models ---------------------------------------------------------------------

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
        if path.is_file() and _kind(path) == "dicom":
            header = _dcmread(path, header_only=True)
            if _frame_count(header) == 1 and "Rows" in header:
                uid = str(header.get("SeriesInstanceUID") or "")
                series[(path.parent, uid)].append((path, header))
                continue
        volumes.append(open_volume(path, window))
    for (folder, _), items in series.items():
        if len(items) == 1:
            volumes.append(open_volume(items[0][0], window))  # raises: one slice is no stack
        else:
            volumes.append(_series_volume(folder, items, window))
    if not volumes:
        raise DataSourceError("no validation volumes given", hint=STACK_HINT)
    stacks = []
    for volume in volumes:
        _check_depth(volume, depth)
        centres = sorted(set(_evenly_spaced(len(volume), min(per_volume, len(volume)))))
        stacks += [volume_stack(volume, depth, centre) for centre in centres]
    return stacks
