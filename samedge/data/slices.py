"""Slices and volumes: the display-ready images every reader returns and every model consumes.

Volumes are opened from headers only and read one slice at a time on access, so hundreds of
calibration slices never sit in memory at once.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from samedge.errors import DataSourceError, ImageError

if TYPE_CHECKING:
    from samedge.data.geometry import Geometry


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
        geometry: Callable[[], Geometry] | None = None,
    ):
        self.name, self.modality, self.source = name, modality, source
        self._length, self._read = length, read
        self._geometry_factory, self._geometry = geometry, None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Slice:
        return self._read(self._position(index))

    @property
    def geometry(self) -> Geometry:
        """The stored voxel grid (``data.geometry``), worked out on first use: checks that only
        segmentation needs (regular spacing, one orientation) never stop calibration reads."""
        if self._geometry is None:
            if self._geometry_factory is None:
                raise DataSourceError(
                    f"{self.name}: this kind of volume records no voxel geometry to place a "
                    "segmentation in", hint="use a DICOM series folder or a NIfTI file")
            self._geometry = self._geometry_factory()
        return self._geometry

    def images(self) -> Sequence[np.ndarray]:
        """The slices' images as a lazy sequence (each read on access), for the runtime."""
        return _Images(self)

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


class _Images(Sequence):
    """A volume's images, each read on access: what the runtime's VolumePredictor takes."""

    def __init__(self, volume: Volume):
        self._volume = volume

    def __len__(self) -> int:
        return len(self._volume)

    def __getitem__(self, index):
        return self._volume[index].image


def evenly_spaced(length: int, count: int, offset: float = 0.5) -> list[int]:
    """``count`` indices over ``length`` slices, one per equal stretch (``offset`` in [0, 1))."""
    return [int((j + offset) * length / count) for j in range(count)]
