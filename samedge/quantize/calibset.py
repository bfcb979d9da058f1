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

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from samedge.data.bundled import bundled_calibration_paths
from samedge.data.items import encoder_tensor
from samedge.data.prompts import (
    PromptPolicy,
)
from samedge.data.sampling import iter_calibration_slices
from samedge.data.slices import Slice
from samedge.data.windows import Window
from samedge.errors import DataSourceError, ImageError
from samedge.runtime.prompts import sparse_prompt
from samedge.runtime.transforms import (
    ImageFrame,
    Preprocessing,
)


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
        from samedge.data.sampling import augment_slice as _augment
        from samedge.data.sampling import augment_stack

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




def decoder_prompts(item: Slice, frame: ImageFrame, pre: Preprocessing, prompts: PromptPolicy,
                    max_prompts: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(coords (B, N, 2), labels (B, N)) in the model frame, built by the Predictor's own
    :func:`~samedge.runtime.prompts.sparse_prompt`: the boxes, then (point-trained families)
    one centre click per box."""
    prompt = prompts.prompt_set(item)
    coords, labels, _ = sparse_prompt(None, None, prompt.boxes[:max_prompts], frame, pre)
    yield coords, labels
    if prompt.clicks is not None:
        clicks = prompt.model_clicks(pre)[:max_prompts]
        coords, labels, _ = sparse_prompt(clicks, np.ones(clicks.shape[:2]), None, frame, pre)
        yield coords, labels
