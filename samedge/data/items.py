"""One way to read the slices (or depth stacks) a verb validates on, for every verb.

Export, pipeline, build and validate all take "validation data" and all mean the same thing by
it: for 2-D models slices, for depth models stacks of D adjacent slices cut from volumes. Reading
it here once keeps their hold-out sets and their error messages alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from samedge.data.bundled import bundled_slices, bundled_stacks, held_out_slices, held_out_stacks
from samedge.data.open import load_image, read_stacks
from samedge.data.sampling import iter_calibration_slices
from samedge.data.slices import Slice
from samedge.data.windows import Window
from samedge.runtime.transforms import (
    ImageFrame,
    Preprocessing,
    preprocess,
    preprocess_stack,
)

Item = Slice | Sequence[Slice]
"""A slice for 2-D models, a stack of D adjacent slices for depth models."""

DEFAULT_STACKS = 3  # stacks of the bundled MR volume when no data is given to a depth model


def read_items(paths: Iterable[str | Path] | None, depth: int = 1, count: int | None = None,
               window: Window | None = None, modality: str | None = None,
               per_volume: int = 2, held_out: bool = False) -> list[Item]:
    """Validation items from ``paths``, or the bundled real data when ``paths`` is None: what
    the pipeline validates on, or with ``held_out`` what no pipeline step reads.

    2-D models: with ``count`` None one slice per path (a volume's middle slice), else up to
    ``count`` slices spread over all sources. Depth models: ``per_volume`` stacks of ``depth``
    adjacent slices spread along each volume.
    """
    if paths is None and held_out:
        return held_out_stacks(depth) if depth > 1 else held_out_slices()
    if paths is None:
        return bundled_stacks(depth, DEFAULT_STACKS) if depth > 1 else bundled_slices()
    paths = list(paths)
    if depth > 1:
        return read_stacks(paths, depth, per_volume=per_volume, window=window)
    if count is None:
        return [load_image(p, window=window, modality=modality) for p in paths]
    with warnings.catch_warnings():  # fewer slices than ``count`` is expected for validation
        warnings.simplefilter("ignore")
        return list(iter_calibration_slices(paths, count, 0, window, False, modality))


def centre(item: Item) -> Slice:
    """The slice prompts are decoded on: the slice itself, or a stack's centre."""
    return item if isinstance(item, Slice) else item[len(item) // 2]


def encoder_tensor(item, pre: Preprocessing, depth: int = 1) -> tuple[np.ndarray, ImageFrame]:
    """The runtime's own encoder input for a slice (depth 1) or a stack of ``depth`` slices."""
    if depth == 1:
        return preprocess(item.image, pre)
    return preprocess_stack([piece.image for piece in item], pre, depth)
