"""Calibration sampling: slices spread across patients and along each volume, read lazily."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from samedge.data.dicom import read_dicom_series
from samedge.data.formats import FORMATS_HINT, file_kind, visible_files
from samedge.data.images import read_image_file
from samedge.data.open import load_image, open_source
from samedge.data.slices import Slice, Volume, evenly_spaced
from samedge.data.windows import Window, parse_window
from samedge.errors import DataSourceError, ImageError


def _lazy_source(path: Path, window: Window | None, modality: str | None) -> Volume:
    """A Volume even for single images, so that their pixels too are read only when sampled."""
    opened = None if file_kind(path) == "image" else open_source(path, window, modality)
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
    kinds = {path: file_kind(path) for path in visible_files(folder)}
    sources = [read_dicom_series(folder, window=window)] if "dicom" in kinds.values() else []
    images = [path for path, kind in kinds.items() if kind == "image"]
    sources += [_image_set(folder, images, window, modality)] if images else []
    volumes = [path for path, kind in kinds.items() if kind in ("nifti", "npz")]
    sources += [_lazy_source(path, window, modality) for path in volumes]
    for sub in (path for path, kind in kinds.items() if kind == "series"):
        sources += _folder_sources(sub, window, modality)
    return sources


def _round_robin(lengths: list[int], count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(source, slice) pairs: one slice per source in turn, each source's slices evenly spaced."""
    quotas, remaining = [0] * len(lengths), count
    while remaining and any(q < n for q, n in zip(quotas, lengths)):
        for k, n in enumerate(lengths):
            if remaining and quotas[k] < n:
                quotas[k], remaining = quotas[k] + 1, remaining - 1
    picks = [evenly_spaced(n, q, rng.random()) for n, q in zip(lengths, quotas)]
    rounds = range(max(quotas))
    return [(k, picks[k][r]) for r in rounds for k in range(len(lengths)) if r < quotas[k]]


def augment_slice(item: Slice, rng: np.random.Generator) -> Slice:
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
            yield augment_slice(item, rng)
        else:
            yield augment_stack(item, rng)


def augment_stack(stack: Sequence[Slice], rng: np.random.Generator) -> list[Slice]:
    """:func:`augment_slice` with one draw for the whole stack: adjacent slices must stay alike."""
    seed = int(rng.integers(2**32))
    return [augment_slice(item, np.random.default_rng(seed)) for item in stack]

