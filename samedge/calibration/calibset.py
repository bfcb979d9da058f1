"""The calibration set: real slices → exactly the tensors the engines will see at the bedside.

Encoder inputs come from :func:`samedge.runtime.transforms.preprocess` — the runtime's own
preprocessing, never a copy — so activation ranges are measured on the tensors the runtime will
feed. Decoder inputs are realistic too: the FP32 encoder's embeddings of real slices, with the
prompts a user gives (boxes from masks or from the slice itself, and centre clicks for
point-trained families), transformed by the runtime's own coordinate transform.

Everything streams. A :class:`CalibrationSet` holds file paths and a sampling plan, not pixels:
each pass re-reads one slice at a time (NNCF iterates a dataset several times), so calibrating on
300 slices never holds more than the slice in flight.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from samedge.calibration.drift import PromptSet
from samedge.calibration.prompts import auto_boxes, box_centres, box_from_mask
from samedge.calibration.sources import Slice, iter_calibration_slices
from samedge.calibration.windows import Window
from samedge.errors import DataSourceError, ImageError, PromptError
from samedge.runtime.transforms import (
    ImageFrame,
    Preprocessing,
    check_boxes,
    check_points,
    preprocess,
    preprocess_stack,
    transform_boxes,
    transform_points,
)

# Real medical images shipped inside pydicom and nibabel that are *not* among
# ``bundled_slices()`` (the default validation set): calibration on them keeps validation held out.
# NM, ultrasound (single and 30 frames), MR volumes; other slices of the validation MR volumes.
BUNDLED_CALIBRATION_DICOM = (
    "JPEG2000.dcm", "examples_jpeg2k.dcm", "examples_ybr_color.dcm", "examples_rgb_color.dcm",
    "examples_palette.dcm", "image_dfl.dcm",
)
BUNDLED_CALIBRATION_NIFTI = (
    "example4d.nii.gz", "anatomical.nii", "example_nifti2.nii.gz", "reoriented_anat_moved.nii",
)
PROMPT_MODES = ("auto", "boxes-from-masks", "file")


def _package_data(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent.joinpath(*parts) if spec is not None and spec.origin else None


def bundled_calibration_paths() -> list[Path]:
    """Files for the default calibration set (held out from the bundled validation slices)."""
    paths = []
    dicom = _package_data("pydicom", "data", "test_files")
    nifti = _package_data("nibabel", "tests", "data")
    if dicom is not None:
        paths += [dicom / name for name in BUNDLED_CALIBRATION_DICOM if (dicom / name).is_file()]
    if nifti is not None:
        paths += [nifti / name for name in BUNDLED_CALIBRATION_NIFTI if (nifti / name).is_file()]
    if not paths:
        raise DataSourceError("no bundled calibration images (pydicom and nibabel missing)",
                              hint="pip install samedge[data], or pass --data DIR")
    return paths


class Feeds:
    """A re-iterable stream of graph input dicts: every ``iter()`` starts a fresh pass."""

    def __init__(self, make: Callable[[], Iterator[dict[str, np.ndarray]]], size: int,
                 description: str):
        self._make, self.size, self.description = make, size, description

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._make()

    def __len__(self) -> int:
        return self.size

    def take(self, count: int) -> list[dict[str, np.ndarray]]:
        """The first ``count`` items (materialised: only for small subsets)."""
        out = []
        for item in self:
            if len(out) >= count:
                break
            out.append(item)
        return out


# -- prompts ---------------------------------------------------------------------------------------
@dataclass
class PromptPolicy:
    """How prompts are derived per slice, for validation and decoder calibration.

    ``auto``: boxes from the image itself (:func:`auto_boxes`: the Otsu foreground box, its halves
    and its centre — deterministic, so figures are comparable between runs); ``boxes-from-masks``:
    one box per label of the slice's mask (with optional ``jitter`` × size per side), or its stored
    box; ``file``: a JSON file ``{"slice name": [[x0, y0, x1, y1], ...]}``. ``clicks`` adds a
    centre click per box (for point-trained families). Boxes outside the image raise PromptError.
    """

    mode: str = "auto"
    jitter: float = 0.0
    clicks: bool = False
    prompts_file: Path | None = None
    seed: int = 0
    _file_boxes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in PROMPT_MODES:
            raise PromptError(f"unknown prompt mode {self.mode!r}", hint=f"use one of {PROMPT_MODES}")
        if self.mode == "file":
            if self.prompts_file is None:
                raise PromptError("prompt mode 'file' needs prompts_file")
            try:
                data = json.loads(Path(self.prompts_file).read_text())
            except (OSError, ValueError) as exc:
                raise PromptError(f"cannot read prompts file {self.prompts_file}: {exc}",
                                  hint='write {"slice name": [[x0, y0, x1, y1], ...]}') from exc
            if not isinstance(data, dict):
                raise PromptError(f"{self.prompts_file} must map slice names to box lists")
            self._file_boxes = data

    def boxes(self, item: Slice) -> np.ndarray:
        """(B, 4) xyxy boxes for one slice, validated against its size."""
        image = item.image
        if self.mode == "file":
            if item.name not in self._file_boxes:
                raise PromptError(f"prompts file has no boxes for slice {item.name!r}",
                                  hint="keys must be the slice names (see `samedge info`)")
            boxes = np.asarray(self._file_boxes[item.name], dtype=np.float32).reshape(-1, 4)
        elif self.mode == "boxes-from-masks":
            if item.box is not None:
                boxes = np.asarray(item.box, dtype=np.float32)[None]
            elif item.mask is not None and item.mask.any():
                rng = np.random.default_rng(self.seed)
                labels = [v for v in np.unique(item.mask) if v != 0]
                boxes = np.stack([box_from_mask(item.mask == v, self.jitter, rng)
                                  for v in labels])
            else:
                raise PromptError(
                    f"slice {item.name} has no mask or box to derive prompts from",
                    hint="pass labelled data (npz with mask/box) or use --prompts auto")
        else:
            boxes = auto_boxes(image)
        return check_boxes(boxes, ImageFrame(image.shape[:2], image.shape[:2])).astype(np.float32)

    def prompt_set(self, item: Slice) -> PromptSet:
        boxes = self.boxes(item)
        return PromptSet(boxes=boxes, clicks=box_centres(boxes) if self.clicks else None)


# -- the calibration set ---------------------------------------------------------------------------
@dataclass
class CalibrationSet:
    """Slices sampled across sources (or given in memory), turned into graph inputs on demand.

    ``paths``: DICOM series folders, NIfTI/npz files, image folders (see ``sources``); ``None``
    means the bundled real slices held out from validation (:func:`bundled_calibration_paths`).
    ``slices``: in-memory slices (or depth models' stacks of adjacent slices) instead of paths
    (small sets, tests). Opening happens now, so an empty or unreadable folder fails here with
    :class:`DataSourceError`; pixels are read per pass.
    """

    paths: Sequence[str | Path] | None = None
    count: int = 64
    seed: int = 0
    window: Window | None = None
    augment: bool = True
    modality: str | None = None
    slices: Sequence[Slice] | None = None

    def __post_init__(self) -> None:
        if self.slices is not None:
            self.slices = list(self.slices)
            if not self.slices:
                raise DataSourceError("calibration set is empty", hint="pass at least one slice")
            for item in self.slices:
                pieces = [item] if isinstance(item, Slice) else item
                if not isinstance(pieces, (list, tuple)) or not pieces or \
                        not all(isinstance(piece, Slice) for piece in pieces):
                    raise ImageError("calibration slices must be Slice objects or stacks (lists) "
                                     f"of them, got {type(item)}")
            self.count = min(self.count, len(self.slices)) if not self.augment else self.count
            return
        self.paths = [Path(p) for p in (bundled_calibration_paths() if self.paths is None
                                        else ([self.paths] if isinstance(self.paths, (str, Path))
                                              else self.paths))]
        if not self.paths:
            raise DataSourceError("no calibration data given", hint="pass --data DIR")
        for path in self.paths:
            if path.is_dir() and not any(p for p in path.iterdir() if not p.name.startswith(".")):
                raise DataSourceError(f"calibration folder {path} is empty",
                                      hint="point --data at a folder of DICOM/NIfTI/PNG/npz files")
        # Opens every source (headers only): unreadable inputs fail now, not mid-calibration.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._plan_iter()
        self.available = self.count
        for warning in caught:
            text = str(warning.message)
            if text.startswith("only "):
                self.available = int(text.split()[1])
            else:
                warnings.warn(text, stacklevel=2)
        if self.available < self.count:
            warnings.warn(f"only {self.available} calibration slices available, {self.count} "
                          "requested; pass augment=True to top up", stacklevel=2)
            self.count = self.available

    def _plan_iter(self, depth: int = 1) -> Iterator:
        return iter_calibration_slices(self.paths, self.count, self.seed, self.window,
                                       self.augment, self.modality, depth)

    def iter_slices(self) -> Iterator[Slice]:
        """A fresh pass over the slices, read one at a time."""
        return self.iter_items(1)

    def iter_items(self, depth: int = 1) -> Iterator[Slice] | Iterator[list[Slice]]:
        """A fresh pass: slices for 2-D models; for depth models (``depth`` > 1) each sampled
        slice with its neighbours, ``depth`` adjacent slices of its volume (what the encoder
        of a depth model sees at run time, not one slice repeated)."""
        if self.slices is not None:
            return self._memory_items(depth)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported once in __post_init__
            return self._plan_iter(depth)

    def _memory_items(self, depth: int) -> Iterator:
        # same augmentation as file sources
        from samedge.calibration.sources import _augment, augment_stack

        rng = np.random.default_rng(self.seed)
        for index in range(self.count):
            item = self.slices[index % len(self.slices)]
            if depth == 1:
                item = item if isinstance(item, Slice) else item[len(item) // 2]
                yield _augment(item, rng) if index >= len(self.slices) else item
                continue
            stack = list(item) if not isinstance(item, Slice) else [item] * depth
            if len(stack) != depth:
                raise ImageError(f"calibration stack of {len(stack)} slices for a model of "
                                 f"depth {depth}", hint=f"pass stacks of {depth} adjacent slices")
            yield augment_stack(stack, rng) if index >= len(self.slices) else stack

    def __len__(self) -> int:
        return self.count

    def describe(self) -> dict:
        """What the manifest records about the calibration data."""
        sources = ([str(p) for p in self.paths] if self.slices is None
                   else sorted({s.name for s in self.slices}))
        return {"slices": self.count, "seed": self.seed, "augment": self.augment,
                "window": self.window, "sources": sources}

    # -- encoder ---------------------------------------------------------------------------------
    def encoder_inputs(self, pre: Preprocessing, depth: int = 1) -> Feeds:
        """``{"image": (D, 3, S, S)}`` per slice (D = 1) or stack of ``depth`` adjacent slices,
        through the runtime's ``preprocess`` / ``preprocess_stack``."""

        def make() -> Iterator[dict[str, np.ndarray]]:
            for item in self.iter_items(depth):
                yield {"image": encoder_tensor(item, pre, depth)[0]}

        unit = "slices" if depth == 1 else f"stacks of {depth} slices"
        return Feeds(make, self.count, f"{self.count} {unit} → encoder input")

    # -- decoder ---------------------------------------------------------------------------------
    def decoder_inputs(self, pre: Preprocessing, encode: Callable[[np.ndarray], np.ndarray],
                       prompts: PromptPolicy | None = None, mask_size: int | None = None,
                       max_prompts: int = 16, depth: int = 1) -> Feeds:
        """Realistic decoder feeds: the encoder's embeddings of real slices and real prompts.

        Per slice: all its boxes in one batch (labels 2/3) and, when the policy adds clicks, the
        centre clicks with SAM's padding point (labels 1/-1). Coordinates go through the runtime's
        own transforms. ``encode`` maps the encoder input tensor to the embedding (an FP32 graph).
        Depth models encode each stack and decode on its centre slice, as the Predictor does.
        """
        prompts = prompts or PromptPolicy()
        size = mask_size or pre.mask_size

        def make() -> Iterator[dict[str, np.ndarray]]:
            for entry in self.iter_items(depth):
                tensor, frame = encoder_tensor(entry, pre, depth)
                embedding = encode(tensor)
                item = entry
                if depth > 1:
                    item, embedding = entry[depth // 2], embedding[depth // 2 : depth // 2 + 1]
                for coords, labels in decoder_prompts(item, frame, pre, prompts, max_prompts):
                    count = coords.shape[0]
                    yield {
                        "image_embeddings": embedding,
                        "point_coords": coords,
                        "point_labels": labels,
                        "mask_input": np.zeros((count, 1, size, size), np.float32),
                        "has_mask_input": np.zeros(count, np.float32),
                    }

        per_slice = 2 if prompts.clicks else 1
        return Feeds(make, self.count * per_slice, f"{self.count} slices → decoder input")

    def semantic_decoder_inputs(self, pre: Preprocessing,
                                encode: Callable[[np.ndarray], np.ndarray], depth: int = 1
                                ) -> Feeds:
        """Prompt-free (semantic) decoder feeds: ``{"image_embeddings": (D, C, h, w)}`` per
        slice or stack, the FP32 encoder's own embeddings of real data."""

        def make() -> Iterator[dict[str, np.ndarray]]:
            for entry in self.iter_items(depth):
                yield {"image_embeddings": encode(encoder_tensor(entry, pre, depth)[0])}

        return Feeds(make, self.count, f"{self.count} slices → semantic decoder input")


def encoder_tensor(item, pre: Preprocessing, depth: int = 1) -> tuple[np.ndarray, ImageFrame]:
    """The runtime's own encoder input for a slice (depth 1) or a stack of ``depth`` slices."""
    if depth == 1:
        return preprocess(item.image, pre)
    return preprocess_stack([piece.image for piece in item], pre, depth)


def decoder_prompts(item: Slice, frame: ImageFrame, pre: Preprocessing, prompts: PromptPolicy,
                    max_prompts: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(coords (B, N, 2), labels (B, N)) in the model frame, as the Predictor builds them."""
    prompt = prompts.prompt_set(item)
    boxes = prompt.boxes[:max_prompts]
    corners = transform_boxes(boxes, frame, pre)
    labels = np.broadcast_to(np.float32([2, 3]), (len(boxes), 2))
    yield np.ascontiguousarray(corners, np.float32), np.ascontiguousarray(labels, np.float32)
    if prompt.clicks is not None:
        clicks = prompt.model_clicks(pre)[:max_prompts]
        points, marks = check_points(clicks, np.ones(clicks.shape[:2]), frame, pre)
        coords = np.concatenate([transform_points(points, frame, pre),
                                 np.zeros((len(points), 1, 2), np.float32)], axis=1)
        labels = np.concatenate([marks, np.full((len(points), 1), -1.0, np.float32)], axis=1)
        yield np.ascontiguousarray(coords, np.float32), np.ascontiguousarray(labels, np.float32)


def load_slices(paths: Iterable[str | Path], count: int = 1000, window: Window | None = None,
                modality: str | None = None, seed: int = 0) -> list[Slice]:
    """Validation slices (small sets): up to ``count`` slices spread over the sources."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(iter_calibration_slices(list(paths), count, seed, window, False, modality))
