"""Volumes through a Predictor: each slice (or depth stack) encoded once, a prompt followed from
slice to slice, and MA-SAM's overlapping windows averaged before the argmax.

The caller reads the files (``samedge.data``) and hands over the slices' images in slice order;
``samedge.data.geometry`` maps the answer back to the file's voxels. Numpy and the Predictor's
backend only: no torch, every backend and precision variant.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from samedge.errors import ImageError, PromptError, StackDepthError
from samedge.runtime.postprocess import class_probabilities, probability_maps
from samedge.runtime.predictor import Predictor
from samedge.runtime.transforms import ImageFrame, preprocess, preprocess_stack

DEFAULT_CACHE_BYTES = 1 << 30  # 256 LiteMedSAM / SAM ViT slice embeddings (4 MiB each)
BOX_MARGIN = 3 / 256  # LiteMedSAM's 3-D challenge inference widens the neighbour's box 3 px at 256²
OVERLAP_BACKENDS = frozenset({"onnxruntime", "openvino"})  # encoder and decoder may run at once

Progress = Callable[[], object] | None
Entry = tuple[np.ndarray, ImageFrame]


@dataclass
class VolumeMask:
    """One prompt's answer: ``mask`` (N, H, W) bool in slice order, ``scores`` (N,) the predicted
    IoU on each decoded slice (NaN on the others), ``start`` the slice the prompt was given on."""

    mask: np.ndarray
    scores: np.ndarray
    start: int

    @property
    def decoded(self) -> np.ndarray:
        return np.flatnonzero(np.isfinite(self.scores))


@dataclass
class VolumeLabels:
    """A semantic family's label volume: ``labels`` (N, H, W) class ids in slice order (0 =
    background), ``classes`` = K + 1, ``names`` the K class names where the bundle records them."""

    labels: np.ndarray
    classes: int
    names: list[str] | None = None


class EmbeddingCache:
    """Encoder outputs by key; the least recently used leave first once their bytes exceed
    ``max_bytes`` (the newest entry always stays). Safe to fill from a prefetching thread."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self._items: OrderedDict[Hashable, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> Entry | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
            return entry

    def put(self, key: Hashable, entry: Entry) -> None:
        with self._lock:
            if key in self._items:
                self.nbytes -= self._items.pop(key)[0].nbytes
            self._items[key] = entry
            self.nbytes += entry[0].nbytes
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                self.nbytes -= self._items.popitem(last=False)[1][0].nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


class VolumePredictor:
    """Segment volumes with one :class:`Predictor`.

    >>> volume = VolumePredictor(Predictor("bundle/"))
    >>> volume.set_volume(images)            # (N, H, W[, 3]) array, or any sequence of slices
    >>> liver = volume.predict_box((120, 80, 30, 260, 210, 58))   # x0, y0, n0, x1, y1, n1
    >>> lesion = volume.predict_point([(140, 120, 44)])            # encodes nothing new

    2-D prompt models encode each slice once; depth prompt models (Med-SA 3D) encode consecutive
    stacks of D slices (Med-SA's evaluation chunks, the last one aligned to the volume's end);
    semantic families answer :meth:`segment` (MA-SAM: one window of D slices centred on every
    slice, edges replicated, class probabilities averaged over the windows that cover a slice,
    zoomed to the slice and argmaxed, as its upstream ``test.py``). Coordinates are slice pixels
    (x = column, y = row) and slice indices n. ``encoder_calls`` counts encoder runs;
    ``overlap`` encodes the next slice in a background thread while the current one decodes
    (ONNX Runtime and OpenVINO).
    """

    def __init__(self, predictor: Predictor, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 margin: float = BOX_MARGIN, refine: bool = False, overlap: bool = True):
        self.predictor, self.margin, self.refine = predictor, margin, refine
        self.overlap = overlap and predictor.backend in OVERLAP_BACKENDS
        self.cache = EmbeddingCache(cache_bytes)
        self.encoder_calls = 0
        self._slices: Sequence | None = None
        self._frame: ImageFrame | None = None
        self._classes = 0
        self._pending: dict[Hashable, Future] = {}
        self._encoder_lock = threading.Lock()  # one encoder request at a time (OpenVINO)

    # -- volume and embeddings -------------------------------------------------------------------
    def set_volume(self, slices: Sequence) -> None:
        """The volume's slices in order: an (N, H, W[, 3]) array or a sequence of images read on
        access. Embeddings of a previous volume are dropped."""
        count, depth = len(slices), self.predictor.depth
        if count < 2:
            raise StackDepthError(f"a volume needs at least 2 slices; got {count}",
                                  hint="segment a single 2-D image with predict")
        if count < depth:
            raise StackDepthError(f"the volume has {count} slices; this model's encoder takes "
                                  f"a stack of {depth} adjacent slices",
                                  hint=f"pass a volume of at least {depth} slices")
        self._slices, self._frame = slices, None
        self.cache.clear()

    @property
    def slices(self) -> Sequence:
        if self._slices is None:
            raise PromptError("no volume set", hint="call set_volume(slices) first")
        return self._slices

    def _mode(self) -> str:
        if self.predictor.depth == 1:
            return "slice"
        return "window" if self.predictor.semantic else "chunk"

    def _key(self, n: int) -> int:
        """The cache key of slice ``n``: the slice, or the first slice of its stack."""
        depth = self.predictor.depth
        if self._mode() != "chunk":
            return n
        return min((n // depth) * depth, len(self.slices) - depth)

    def _images(self, key: int) -> list:
        depth, last = self.predictor.depth, len(self.slices) - 1
        mode = self._mode()
        if mode == "slice":
            return [self.slices[key]]
        first = key if mode == "chunk" else key - depth // 2
        indices = [min(max(i, 0), last) for i in range(first, first + depth)]
        read = {i: self.slices[i] for i in sorted(set(indices))}
        return [read[i] for i in indices]

    def _encode(self, key: int) -> Entry:
        images, pre = self._images(key), self.predictor.pre
        if self.predictor.depth == 1:
            tensor, frame = preprocess(images[0], pre)
        else:
            tensor, frame = preprocess_stack(images, pre, self.predictor.depth)
        with self._encoder_lock:
            if self._frame is not None and frame.original_hw != self._frame.original_hw:
                raise ImageError(f"slices of one volume must share one size; got "
                                 f"{frame.original_hw} and {self._frame.original_hw}")
            self._frame = frame
            embeddings = self.predictor.encoder.run({"image": tensor})["image_embeddings"]
            self.encoder_calls += 1
        entry = (embeddings, frame)
        self.cache.put(key, entry)
        return entry

    def _embedding(self, key: int) -> Entry:
        entry = self.cache.get(key)
        if entry is None:
            pending = self._pending.pop(key, None)
            entry = pending.result() if pending is not None else self._encode(key)
        return entry

    def _prefetch(self, pool: ThreadPoolExecutor | None, n: int | None) -> None:
        if pool is None or n is None or not 0 <= n < len(self.slices):
            return
        key = self._key(n)
        if key not in self._pending and key not in self.cache:
            self._pending[key] = pool.submit(self._encode, key)

    @contextlib.contextmanager
    def _workers(self) -> Iterator[ThreadPoolExecutor | None]:
        try:
            if self.overlap:
                with ThreadPoolExecutor(1, thread_name_prefix="samedge-encode") as pool:
                    yield pool
            else:
                yield None
        finally:
            self._pending.clear()

    # -- prompts ---------------------------------------------------------------------------------
    def _decode(self, n: int, **prompt) -> tuple[np.ndarray, float, np.ndarray]:
        key = self._key(n)
        embeddings, frame = self._embedding(key)
        self.predictor.set_embedding(embeddings, frame, n - key)
        result = self.predictor.predict(multimask_output=False, **prompt)
        return result.masks[0], float(result.scores[0]), result.low_res_logits[:1]

    def _hw(self, n: int) -> tuple[int, int]:
        return self._embedding(self._key(n))[1].original_hw

    def _check_slices(self, *indices: int) -> None:
        count = len(self.slices)
        for n in indices:
            if not 0 <= n < count:
                raise PromptError(f"slice {n} lies outside the volume's {count} slices",
                                  hint=f"slice indices run 0..{count - 1}")

    def predict_box(self, box3d: Sequence[float], progress: Progress = None) -> VolumeMask:
        """``box3d`` = x0, y0, n0, x1, y1, n1 (pixels and slice indices, inclusive). The 2-D box
        goes to the middle slice (n0 + n1) // 2; each further slice outward, up to n0 and n1,
        gets the box of its neighbour's mask widened by ``margin`` × the longest side and
        clipped to the 3-D box; a side stops where the mask vanishes."""
        x0, y0, n0, x1, y1, n1 = (float(v) for v in box3d)
        n0, n1 = int(n0), int(n1)
        self._check_slices(n0, n1)
        if n1 < n0 or x1 < x0 or y1 < y0:
            raise PromptError(f"3-D box {list(box3d)} is inverted",
                              hint="give x0, y0, n0, x1, y1, n1 with the low corner first")
        start = (n0 + n1) // 2
        height, width = self._hw(start)
        if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
            raise PromptError(f"3-D box {list(box3d)} reaches outside the {width}x{height} slices",
                              hint=f"x runs 0..{width - 1}, y 0..{height - 1}")
        bounds = (x0, y0, x1, y1)
        return self._propagate(start, (n0, n1), bounds, progress, boxes=np.array(bounds))

    def predict_point(self, points: Sequence[Sequence[float]], labels: Sequence[int] | None = None,
                      progress: Progress = None) -> VolumeMask:
        """Points (P, 3) x, y, n on one slice, ``labels`` 1 foreground (default) / 0 background;
        that slice is decoded from the points, the others outward from their neighbour's mask
        box until it vanishes."""
        array = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        marks = np.ones(len(array)) if labels is None else np.asarray(labels, dtype=np.float64)
        if len(array) == 0 or marks.shape != (len(array),):
            raise PromptError("give points as (x, y, n) with one label each")
        if len(set(array[:, 2].tolist())) != 1 or array[0, 2] != int(array[0, 2]):
            raise PromptError(f"points {array.tolist()} are not on one slice",
                              hint="the points of one prompt share their slice index n")
        start = int(array[0, 2])
        self._check_slices(start)
        height, width = self._hw(start)
        xy = array[:, :2]
        if (xy < 0).any() or (xy[:, 0] > width - 1).any() or (xy[:, 1] > height - 1).any():
            raise PromptError(f"a point lies outside the {width}x{height} slices")
        if self.predictor.pre.point_order == "yx":  # Med-SA reads clicks as (row, col)
            xy = xy[:, ::-1]
        bounds = (0.0, 0.0, width - 1.0, height - 1.0)
        return self._propagate(start, (0, len(self.slices) - 1), bounds, progress,
                               point_coords=xy, point_labels=marks)

    def _propagate(self, start: int, ends: tuple[int, int], bounds, progress: Progress,
                   **prompt) -> VolumeMask:
        count, (height, width) = len(self.slices), self._hw(start)
        result = VolumeMask(np.zeros((count, height, width), bool), np.full(count, np.nan), start)
        below = start - 1 if start > ends[0] else None  # where the downward pass begins
        with self._workers() as pool:
            self._prefetch(pool, start + 1 if start < ends[1] else below)
            mask, score, low = self._decode(start, **prompt)
            result.mask[start], result.scores[start] = mask, score
            if progress:
                progress()
            self._follow(result, pool, ends[1], 1, bounds, low, progress, then=below)
            self._follow(result, pool, ends[0], -1, bounds, low, progress, then=None)
        if not result.mask.any():
            warnings.warn("the prompt segmented nothing: the mask is empty on every slice",
                          stacklevel=3)
        return result

    def _follow(self, result: VolumeMask, pool, stop: int, step: int, bounds, low: np.ndarray,
                progress: Progress, then: int | None) -> None:
        """Decode outward from the start to ``stop``; the slice after this one is encoded
        meanwhile (``then`` after the last one: the other pass's first slice)."""
        previous = result.mask[result.start]
        for n in range(result.start + step, stop + step, step):
            box = self._box_around(previous, bounds)
            if box is None:
                return
            self._prefetch(pool, n + step if n != stop else then)
            mask_input = low if self.refine else None
            previous, score, low = self._decode(n, boxes=box, mask_input=mask_input)
            result.mask[n], result.scores[n] = previous, score
            if progress:
                progress()

    def _box_around(self, mask: np.ndarray, bounds) -> np.ndarray | None:
        """The mask's bounding box widened by the margin and clipped to ``bounds``; None when
        the mask is empty or lies outside them."""
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return None
        pad = self.margin * max(mask.shape)
        x0, y0, x1, y1 = bounds
        box = np.array([max(cols[0] - pad, x0), max(rows[0] - pad, y0),
                        min(cols[-1] + pad, x1), min(rows[-1] + pad, y1)])
        return box if box[2] >= box[0] and box[3] >= box[1] else None

    # -- semantic families -------------------------------------------------------------------------
    def segment(self, progress: Progress = None) -> VolumeLabels:
        """The label volume of a prompt-free family (SAMed slice by slice, MA-SAM by windows)."""
        predictor = self.predictor
        if not predictor.semantic:
            raise PromptError("this bundle's decoder takes prompts; use predict_box/predict_point",
                              hint="segment() serves semantic families (SAMed, MA-SAM)")
        count, labels = len(self.slices), None
        names = predictor.bundle.model.get("class_names")
        with self._workers() as pool:
            if self._mode() == "slice":
                for n in range(count):
                    self._prefetch(pool, n + 1)
                    embeddings, frame = self._embedding(n)
                    predictor.set_embedding(embeddings, frame)
                    segmentation = predictor.segment()
                    labels = self._labels(labels, segmentation.scores.shape[1], frame)
                    labels[n] = segmentation.labels[0]
                    if progress:
                        progress()
            else:
                labels = self._average_windows(pool, progress)
        return VolumeLabels(labels, int(self._classes), list(names) if names else None)

    def _labels(self, labels, classes: int, frame: ImageFrame) -> np.ndarray:
        if labels is None:
            self._classes = classes
            dtype = np.uint8 if classes <= 256 else np.uint16
            labels = np.zeros((len(self.slices), *frame.original_hw), dtype)
        return labels

    def _average_windows(self, pool, progress: Progress) -> np.ndarray:
        """MA-SAM's volume inference (``test.py``): the class probabilities of every window
        covering a slice summed in window order and divided by the count plus one (its counts
        start at one), then the family's last resize (order-3 zoom) and argmax. Windows are
        summed at the decoder's resolution and each finished slice resized once: the zoom is
        linear, so this equals zooming every window as upstream does, D times cheaper; only the
        D slices still open are held."""
        count, half = len(self.slices), self.predictor.depth // 2
        pre = self.predictor.pre
        sums: dict[int, list] = {}
        labels = None
        for centre in range(count):
            self._prefetch(pool, centre + 1)
            embeddings, frame = self._embedding(centre)
            logits = self.predictor.decoder.run({"image_embeddings": embeddings})["class_logits"]
            labels = self._labels(labels, logits.shape[1], frame)
            for offset, probabilities in enumerate(class_probabilities(logits, frame, pre)):
                target = centre - half + offset
                if 0 <= target < count:
                    entry = sums.setdefault(target, [0.0, 1])
                    entry[0] = entry[0] + probabilities
                    entry[1] += 1
            done = [t for t in sums if t <= centre - half or centre == count - 1]
            for target in sorted(done):
                total, windows = sums.pop(target)
                mean = (total / np.float32(windows))[None]
                labels[target] = probability_maps(mean, frame, pre)[1][0]
                if progress:
                    progress()
        return labels
