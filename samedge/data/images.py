"""Plain images (PNG/JPEG/BMP/TIFF) and MedSAM-style npz archives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from samedge.data.formats import BOX_KEYS, FORMATS_HINT, IMAGE_KEYS, MASK_KEYS
from samedge.data.slices import Slice, Volume
from samedge.data.windows import Window, to_uint8
from samedge.errors import ImageError


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

