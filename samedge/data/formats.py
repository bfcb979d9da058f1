"""Which reader a path needs, decided once: by suffix, or by the DICOM preamble."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from samedge.errors import DataSourceError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGE_KEYS = ("image", "imgs", "img")
MASK_KEYS = ("mask", "gts", "label")
BOX_KEYS = ("box", "boxes")
DATA_HINT = "install the medical readers: pip install samedge[data]"
FORMATS_HINT = "use a DICOM file or series folder, .nii/.nii.gz, .npz, or PNG/JPEG/BMP/TIFF images"
DECODER_HINT = "install a decoder: pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"


def require_module(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataSourceError(f"reading this data needs {module}", DATA_HINT) from exc


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def file_kind(path: Path) -> str | None:
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
    return "dicom" if path.is_file() and is_dicom(path) else None


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))

