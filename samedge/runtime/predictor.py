"""Predictor: SamPredictor's two-step API over a bundle — encode once, decode each prompt fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samedge.errors import PromptError, StackDepthError
from samedge.runtime.backends import open_backend
from samedge.runtime.bundle import Bundle
from samedge.runtime.intensity import WindowArg
from samedge.runtime.postprocess import mask_scores, prompt_masks, semantic_maps
from samedge.runtime.prompts import sparse_prompt
from samedge.runtime.transforms import (
    ImageFrame,
    preprocess,
    preprocess_stack,
)
from samedge.runtime.variants import choose_variant, runtime_options


@dataclass
class Prediction:
    """``masks`` (B, K, H, W) bool at the original size (if asked, the scores they threshold:
    logits, or probabilities where the family resizes those; ``Preprocessing.mask_threshold``),
    ``scores`` (B, K) the predicted IoU, ``low_res_logits`` (B, K, m, m) to feed back as ``mask_input``. The B axis is
    dropped when a single unbatched prompt was given, as SamPredictor does."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


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
        self.encoder = open_backend(backend, self.bundle.entry_path(encoder), threads,
                                    **runtime_options(encoder))
        self.decoder = open_backend(backend, self.bundle.entry_path(decoder), threads,
                                    **runtime_options(decoder))
        self.depth = int(self.bundle.model.get("depth", 1))
        self.semantic = self.bundle.model.get("decoder") == "semantic"
        # Med-SA's decoder graph already returns its family's tokens (0:n whatever the flag).
        decoder_graph = self.bundle.manifest.get("graphs", {}).get("decoder", {})
        self.graph_selects_tokens = decoder_graph.get("token_selection") == "graph"
        self._embeddings: np.ndarray | None = None
        self._frame: ImageFrame | None = None
        self._slice = 0

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

        D must be the bundle's depth (StackDepthError otherwise); ``window`` as in ``set_image``. ``predict`` then decodes
        against the centre slice until ``select_slice`` picks another; ``segment`` answers all D.
        """
        self._encode(*preprocess_stack(stack, self.pre, self.depth, window),
                     current=self.depth // 2)

    def _encode(self, tensor: np.ndarray, frame: ImageFrame, current: int) -> None:
        self._embeddings = self.encoder.run({"image": tensor})["image_embeddings"]
        self._frame, self._slice = frame, current

    def select_slice(self, index: int) -> None:
        """Decode later prompts against slice ``index`` of the encoded stack (no encoder call)."""
        count = len(self.embeddings)
        if not -count <= index < count:
            raise PromptError(f"slice {index} is outside the encoded stack of {count}")
        self._slice = index % count

    def reset_image(self) -> None:
        self._embeddings, self._frame, self._slice = None, None, 0

    @property
    def embeddings(self) -> np.ndarray:
        """(N, C, h, w): every encoded slice's embedding."""
        if self._embeddings is None:
            raise PromptError("no image set", hint="call set_image(image) before predict "
                                                    "(set_volume(stack) for depth models)")
        return self._embeddings

    @property
    def image_embedding(self) -> np.ndarray:
        """(1, C, h, w): the embedding ``predict`` decodes against."""
        return self.embeddings[self._slice : self._slice + 1]

    # -- semantic decoder --------------------------------------------------------------------
    def segment(self) -> Segmentation:
        """Class maps and label map for every encoded slice, at the original image size."""
        if not self.semantic:
            raise PromptError("this bundle's decoder takes prompts; call predict(...)",
                              hint="segment() serves semantic families (SAMed, MA-SAM)")
        low_res = self.decoder.run({"image_embeddings": self.embeddings})["class_logits"]
        scores, labels = semantic_maps(low_res, self._frame, self.pre)
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
        one call. ``multimask_output`` None follows the family's convention (single mask for
        LiteMedSAM/MedSAM, three for SAM); Med-SA returns its output tokens 0:n either way.
        """
        if self.semantic:
            raise PromptError("this bundle's decoder is semantic and takes no prompts",
                              hint="call segment() for class logits and the label map")
        embedding, frame = self.image_embedding, self._frame
        if point_coords is None and boxes is None and mask_input is None:
            raise PromptError(
                "empty prompt: give point_coords/point_labels, boxes or mask_input",
                hint="for prompt-free segmentation use a semantic family (SAMed, MA-SAM)",
            )
        mask_count = np.shape(mask_input)[0] if np.ndim(mask_input) == 4 else 1
        coords, labels, batched = sparse_prompt(point_coords, point_labels, boxes, frame,
                                                self.pre, mask_count)
        count = coords.shape[0]
        mask, has_mask = self._mask_prompt(mask_input, count)
        outputs = self._decode({
            "image_embeddings": embedding,
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": mask,
            "has_mask_input": has_mask,
        }, count)
        multimask = self.multimask_default if multimask_output is None else multimask_output
        if self.graph_selects_tokens:
            tokens = slice(None)
        else:
            tokens = slice(1, None) if multimask else slice(0, 1)
        low_res = outputs["low_res_masks"][:, tokens]
        scores = outputs["iou_predictions"][:, tokens]
        scores_hw = mask_scores(low_res, frame, self.pre)
        masks = scores_hw if return_logits else prompt_masks(scores_hw, self.pre)
        if not batched:
            masks, scores, low_res = masks[0], scores[0], low_res[0]
        return Prediction(masks=masks, scores=scores, low_res_logits=low_res)

    def _decode(self, feed: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
        """One decoder call, or calls of the backend's ``decode_batch`` prompts when it runs
        large prompt batches slower per prompt than small ones (ONNX Runtime on CPU: each prompt
        carries image-sized intermediates, and a batch of 16 outgrows the cache)."""
        step = getattr(self.decoder, "decode_batch", None)
        if not step or count <= step:
            return self.decoder.run(feed)
        parts = [self.decoder.run({name: value if name == "image_embeddings"
                                   else value[start:start + step]
                                   for name, value in feed.items()})
                 for start in range(0, count, step)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _mask_prompt(self, mask_input, count):
        size = self.pre.mask_size
        if mask_input is None:
            return (np.zeros((count, 1, size, size), np.float32), np.zeros(count, np.float32))
        mask = np.asarray(mask_input, dtype=np.float32)
        if mask.ndim == 3:
            mask = mask[None]
        if mask.shape[1:] != (1, size, size) or mask.shape[0] not in (1, count):
            raise PromptError(
                f"mask_input must be (1, {size}, {size}) or (B, 1, {size}, {size}); got "
                f"{np.shape(mask_input)}",
                hint="pass low_res_logits of a previous prediction",
            )
        if not np.isfinite(mask).all():
            raise PromptError("mask_input contains NaN or Inf")
        mask = np.ascontiguousarray(np.broadcast_to(mask, (count, 1, size, size)))
        return mask, np.ones(count, np.float32)
