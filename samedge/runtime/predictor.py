"""Predictor: SamPredictor's two-step API over a bundle — encode once, decode each prompt fast.

Memory stays bounded for any number of prompts: they are decoded in chunks sized so that one
decoder call and its upscaled logits fit :data:`DECODE_MEMORY`, and each chunk is written into the
result as it comes. Threads may share one Predictor: each thread has its own current image, and
each backend runs one call at a time (see README, Robustness).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from samedge.errors import PromptError, StackDepthError
from samedge.runtime.backends import open_backend
from samedge.runtime.bundle import Bundle, runs_stand_in
from samedge.runtime.intensity import WindowArg
from samedge.runtime.postprocess import mask_scores, prompt_masks, semantic_maps
from samedge.runtime.prompts import checked_prompt
from samedge.runtime.transforms import ImageFrame, preprocess, preprocess_stack
from samedge.runtime.variants import choose_variant, runtime_options

# Bytes one decoder call may take: its working memory plus the chunk's upscaled logits.
DECODE_MEMORY = 256 * 2**20
# A prompt's decoder working memory in units of one image embedding's bytes. OpenVINO, the
# hungriest backend, took ~35-41 MiB per box on LiteMedSAM's 4 MiB embedding (docs/robustness.md).
DECODER_WORK_PER_EMBEDDING = 12


@dataclass
class Prediction:
    """``masks`` (B, K, H, W) bool at the original size (if asked, the scores they threshold:
    logits, or probabilities where the family resizes those; ``Preprocessing.mask_threshold``),
    ``scores`` (B, K) the predicted IoU, ``low_res_logits`` (B, K, m, m) to feed back as ``mask_input``. The B axis is
    dropped when a single unbatched prompt was given, as SamPredictor does."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


@dataclass(frozen=True)
class _Image:
    """One thread's encoded image: all slices' embeddings, the frame, the slice decoded."""

    embeddings: np.ndarray
    frame: ImageFrame
    current: int


@dataclass
class Segmentation:
    """A semantic family's answer for each encoded slice (N = 1 after ``set_image``, D after
    ``set_volume``): ``labels`` (N, H, W) the class per pixel (0 = background) as the family's
    upstream script derives it, ``scores`` (N, K+1, H, W) the class maps it resizes to the
    original size (SAMed: logits, nearest; MA-SAM: softmax probabilities, cubic spline; their
    argmax is ``labels``), ``low_res_logits`` (N, K+1, m, m) as decoded."""

    labels: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


class Predictor:
    """Run a bundle's encoder and decoder with one backend.

    >>> predictor = Predictor("bundle/", backend="openvino")
    >>> predictor.set_image(slice_uint8)
    >>> result = predictor.predict(boxes=np.array([[40, 50, 120, 140], [10, 10, 60, 60]]))

    Depth models (``manifest.model.depth`` D > 1) encode D adjacent slices at once with
    ``set_volume``; semantic families (SAMed, MA-SAM) take no prompt and answer ``segment()``.
    Images may be uint8, uint16 or float in [0, 1]; raw CT goes in as HU with ``window="model"``
    (the family's training window) or ``window=(level, width)`` (see ``runtime.intensity``).

    Threads may share one Predictor (a web server's handlers): each thread has its own current
    image, so ``set_image`` then ``predict`` in one thread is never disturbed by another's, and
    each backend runs one call at a time (memory stays that of one call; the calls already use
    every core).
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
        backend: str | None = None,
        precision: str | None = None,
        threads: int | None = None,
        decoder_precision: str | None = None,
    ):
        """``backend``/``precision`` None: the bundle's ``default_variant`` (the fastest variant
        that passed its accuracy gate where the bundle was built) when its backend is installed
        here, else FP32 on the first installed backend the bundle has files for."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        # which variant runs and why (the default, or its fallback on a CPU without its ISA)
        self.choice = choose_variant(self.bundle, backend, precision, decoder_precision)
        backend, precision = self.choice.backend, self.choice.precision
        decoder_precision = self.choice.decoder_precision
        self.backend, self.precision = backend, precision
        self.decoder_precision = decoder_precision or precision
        self.pre = self.bundle.preprocessing
        self.multimask_default = bool(self.bundle.model.get("multimask_default", False))
        encoder = self.bundle.find("encoder", backend, precision)
        decoder = self.bundle.find("decoder", backend, decoder_precision or precision)
        emulated = [a["graph"] for a in (encoder, decoder) if runs_stand_in(a, backend)]
        if emulated:
            self.choice = replace(self.choice, why=(
                f"{self.choice.why}; the {' and '.join(emulated)} run{'s' * (len(emulated) == 1)}"
                " the FP32 stand-in of TensorRT's BF16 graph (BF16 rounding emulated, as "
                "validated; no faster than FP32 here)"))
        self.encoder = open_backend(backend, self.bundle.run_path(encoder, backend), threads,
                                    **runtime_options(encoder))
        self.decoder = open_backend(backend, self.bundle.run_path(decoder, backend), threads,
                                    **runtime_options(decoder))
        self.depth = int(self.bundle.model.get("depth", 1))
        self.semantic = self.bundle.model.get("decoder") == "semantic"
        # Med-SA's decoder graph already returns its family's tokens (0:n whatever the flag).
        decoder_graph = self.bundle.manifest.get("graphs", {}).get("decoder", {})
        self.graph_selects_tokens = decoder_graph.get("token_selection") == "graph"
        self._local = threading.local()  # each thread's _Image (set_image in one thread is
        # invisible to the others, so concurrent requests never decode against another's image)

    # -- encoder -----------------------------------------------------------------------------
    def set_image(self, image: np.ndarray, window: WindowArg = None) -> None:
        """Preprocess and encode one (H, W) or (H, W, 3) image; later ``predict`` calls reuse it.

        uint8 as is, uint16 over its full range, floats as [0, 1]; ``window`` ("model" or
        (level, width)) reads the image as HU and windows it first. Other dtypes are ImageError.
        """
        if self.depth != 1:
            raise StackDepthError(
                f"this model's encoder takes a stack of {self.depth} adjacent slices, not one",
                hint=f"call set_volume with {self.depth} slices (Volume.stack(i, {self.depth}))",
            )
        self._encode(*preprocess(image, self.pre, window), current=0)

    def set_volume(self, stack, window: WindowArg = None) -> None:
        """Encode D adjacent slices (a list of images, or a (D, H, W[, 3]) array) in one call.

        D must be the bundle's depth (StackDepthError otherwise); ``window`` as in ``set_image``.
        ``predict`` then decodes against the centre slice until ``select_slice`` picks another;
        ``segment`` answers all D.
        """
        self._encode(*preprocess_stack(stack, self.pre, self.depth, window),
                     current=self.depth // 2)

    def _encode(self, tensor: np.ndarray, frame: ImageFrame, current: int) -> None:
        embeddings = self.encoder.run({"image": tensor})["image_embeddings"]
        self._local.image = _Image(embeddings, frame, current)

    def set_embedding(self, embeddings: np.ndarray, frame: ImageFrame, current: int = 0) -> None:
        """Decode later prompts against embeddings encoded earlier (``VolumePredictor`` keeps
        them in its cache): (N, C, h, w), slice ``current`` of them, for images of ``frame``."""
        self._local.image = _Image(embeddings, frame, current)

    def select_slice(self, index: int) -> None:
        """Decode later prompts against slice ``index`` of the encoded stack (no encoder call)."""
        image = self._image()
        count = len(image.embeddings)
        if not -count <= index < count:
            raise PromptError(f"slice {index} is outside the encoded stack of {count}")
        self._local.image = _Image(image.embeddings, image.frame, index % count)

    def reset_image(self) -> None:
        self._local.image = None

    def _image(self) -> _Image:
        image = getattr(self._local, "image", None)
        if image is None:
            raise PromptError("no image set", hint="call set_image(image) before predict "
                                                    "(set_volume(stack) for depth models), in the "
                                                    "thread that predicts: each thread has its "
                                                    "own current image")
        return image

    @property
    def embeddings(self) -> np.ndarray:
        """(N, C, h, w): every encoded slice's embedding."""
        return self._image().embeddings

    @property
    def frame(self) -> ImageFrame:
        """Where the current image sits in the model input."""
        return self._image().frame

    @property
    def image_embedding(self) -> np.ndarray:
        """(1, C, h, w): the embedding ``predict`` decodes against."""
        image = self._image()
        return image.embeddings[image.current : image.current + 1]

    # -- semantic decoder --------------------------------------------------------------------
    def segment(self) -> Segmentation:
        """Class maps and label map for every encoded slice, at the original image size."""
        if not self.semantic:
            raise PromptError("this bundle's decoder takes prompts; call predict(...)",
                              hint="segment() serves semantic families (SAMed, MA-SAM)")
        image = self._image()
        low_res = self.decoder.run({"image_embeddings": image.embeddings})["class_logits"]
        scores, labels = semantic_maps(low_res, image.frame, self.pre)
        return Segmentation(labels=labels, scores=scores, low_res_logits=low_res)

    # -- decoder -----------------------------------------------------------------------------
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool | None = None,
        return_logits: bool = False,
    ) -> Prediction:
        """Decode prompts against the current image.

        ``point_coords`` (N, 2) or (B, N, 2) in original pixels with ``point_labels`` (N,) or
        (B, N) (1 foreground, 0 background); ``boxes`` (4,) or (B, 4) xyxy; ``mask_input``
        (1, m, m) or (B, 1, m, m) low-res logits from a previous call. B prompts are decoded in
        chunks that fit ``DECODE_MEMORY``, so memory grows only by the result itself (B·K·H·W
        bools, or float32 logits with ``return_logits``). ``multimask_output`` None follows the
        family's convention (single mask for LiteMedSAM/MedSAM, three for SAM); Med-SA returns
        its output tokens 0:n either way.
        """
        if self.semantic:
            raise PromptError("this bundle's decoder is semantic and takes no prompts",
                              hint="call segment() for class logits and the label map")
        image = self._image()
        embedding = image.embeddings[image.current : image.current + 1]
        coords, labels, batched, mask, has_mask = checked_prompt(
            self.pre, image.frame, point_coords, point_labels, boxes, mask_input)
        multimask = self.multimask_default if multimask_output is None else multimask_output
        if self.graph_selects_tokens:
            tokens = slice(None)
        else:
            tokens = slice(1, None) if multimask else slice(0, 1)
        count = coords.shape[0]
        step = self._chunk(embedding, image.frame, count)
        masks = scores = low_res = None
        for start in range(0, count, step):
            part = slice(start, min(start + step, count))
            outputs = self.decoder.run({
                "image_embeddings": embedding,
                "point_coords": coords[part],
                "point_labels": labels[part],
                "mask_input": np.ascontiguousarray(
                    mask[part] if len(mask) > 1 else np.broadcast_to(
                        mask, (part.stop - part.start, *mask.shape[1:]))),
                "has_mask_input": has_mask[part],
            })
            chunk_low = outputs["low_res_masks"][:, tokens]
            if masks is None:  # the token count is known after the first call (Med-SA: n)
                shape = (count, chunk_low.shape[1])
                low_res = np.empty((*shape, *chunk_low.shape[2:]), np.float32)
                scores = np.empty(shape, np.float32)
                masks = np.empty((*shape, *image.frame.original_hw),
                                 np.float32 if return_logits else bool)
            low_res[part] = chunk_low
            scores[part] = outputs["iou_predictions"][:, tokens]
            scores_hw = mask_scores(chunk_low, image.frame, self.pre)
            masks[part] = scores_hw if return_logits else prompt_masks(scores_hw, self.pre)
        if not batched:
            masks, scores, low_res = masks[0], scores[0], low_res[0]
        return Prediction(masks=masks, scores=scores, low_res_logits=low_res)

    def _chunk(self, embedding: np.ndarray, frame: ImageFrame, count: int) -> int:
        """Prompts per decoder call: as many as fit :data:`DECODE_MEMORY` (decoder working
        memory, all tokens' low-res logits, the chunk's upscaled logits), at most the backend's
        ``decode_batch`` where it runs large batches slower per prompt (ONNX Runtime)."""
        tokens = 4  # SAM's mask tokens; semantic/Med-SA graphs return about as many
        height, width = frame.original_hw
        per_prompt = (DECODER_WORK_PER_EMBEDDING * embedding.nbytes
                      + tokens * self.pre.mask_size ** 2 * 4 + tokens * height * width * 4)
        step = max(1, DECODE_MEMORY // per_prompt)
        limit = getattr(self.decoder, "decode_batch", None)
        return int(min(step, limit or step, count))

