"""The two graphs' contracts: I/O names, dynamic axes and tolerances, and the decoder modules.

The default prompt decoder takes no input whose values decide a shape (Meta's ``orig_im_size``
becomes a TensorRT shape tensor); ``SamInterfaceDecoder`` reproduces Meta's official interface for
existing SAM ONNX clients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samedge.models.card import ModelCard


@dataclass(frozen=True)
class Tolerance:
    """Elementwise bound ``|onnx - torch| <= atol + rtol * |torch|`` declared with each graph."""

    atol: float
    rtol: float = 0.0

    def exceeded(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        return bool(np.any(np.abs(actual - expected) > self.atol + self.rtol * np.abs(expected)))


@dataclass
class GraphSpec:
    """The I/O contract of one graph: names, shapes (str = dynamic axis), dtypes, tolerance."""

    name: str
    inputs: dict[str, tuple]
    outputs: dict[str, tuple]
    tolerances: dict[str, Tolerance]
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for name, shape in {**self.inputs, **self.outputs}.items():
            dyn = {i: d for i, d in enumerate(shape) if isinstance(d, str)}
            if dyn:
                axes[name] = dyn
        return axes

    def describe(self) -> dict:
        def io(items):
            return [
                {"name": n, "shape": list(s), "dtype": self.dtypes.get(n, "float32")}
                for n, s in items.items()
            ]

        return {
            "inputs": io(self.inputs),
            "outputs": io(self.outputs),
            "tolerance": {k: asdict(v) for k, v in self.tolerances.items()},
        }


def encoder_spec(card: ModelCard) -> GraphSpec:
    size, emb = card.image_size, card.embedding_shape
    batch = card.depth
    return GraphSpec(
        "encoder",
        inputs={"image": (batch, 3, size, size)},
        outputs={"image_embeddings": (batch, *emb)},
        tolerances={"image_embeddings": Tolerance(atol=5e-4, rtol=1e-4)},
    )


# -- decoder ------------------------------------------------------------------------------------
class PromptDecoder(nn.Module):
    """Prompt encoder + mask decoder for B prompts of N points against one image embedding.

    Inputs: ``image_embeddings`` (1, C, h, w); ``point_coords`` (B, N, 2) xy in the model input
    frame; ``point_labels`` (B, N) float (0 bg, 1 fg, 2/3 box corners, -1 padding);
    ``mask_input`` (B, 1, m, m); ``has_mask_input`` (B,). Outputs ``low_res_masks`` (B, K, m, m)
    and ``iou_predictions`` (B, K) for *all* K mask tokens; the runtime picks the tokens.
    """

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.image_size = float(image_size)
        self.register_buffer("dense_pe", model.prompt_encoder.get_dense_pe().detach().clone())

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        embedding = pe.pe_layer._pe_encoding((coords + 0.5) / self.image_size)
        labels = labels.unsqueeze(-1)
        is_pad = (labels == -1).to(embedding.dtype)
        embedding = embedding * (1.0 - is_pad) + pe.not_a_point_embed.weight * is_pad
        for index, point_embedding in enumerate(pe.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == index).to(embedding.dtype)
        return embedding

    def embed_masks(self, mask_input: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        has_mask = has_mask.reshape(-1, 1, 1, 1)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask * pe.mask_downscaling(mask_input) + (1.0 - has_mask) * no_mask

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        decoder = self.mask_decoder
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_masks(mask_input, has_mask_input)
        count = sparse.shape[0]
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(count, -1, -1), sparse], dim=1)
        src = image_embeddings.expand(count, -1, -1, -1) + dense
        pos = self.dense_pe.expand(count, -1, -1, -1)
        channels, height, width = src.shape[1:]
        hs, src = decoder.transformer(src, pos, tokens)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(count, channels, height,
                                                                        width))
        hyper = torch.stack(
            [mlp(mask_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
            dim=1,
        )
        up_c, up_h, up_w = upscaled.shape[1:]
        masks = torch.matmul(hyper, upscaled.reshape(count, up_c, up_h * up_w))
        masks = masks.reshape(count, -1, up_h, up_w)
        return masks, decoder.iou_prediction_head(iou_out)


def decoder_spec(card: ModelCard, outputs: int | None = None) -> GraphSpec:
    """The prompt decoder's contract; ``outputs`` overrides the mask count K for decoders that
    select their tokens inside the graph (Med-SA's single-token output)."""
    emb, m = card.embedding_shape, card.preprocessing.mask_size
    k = outputs or card.num_mask_tokens
    return GraphSpec(
        "decoder",
        inputs={
            "image_embeddings": (1, *emb),
            "point_coords": ("prompts", "points", 2),
            "point_labels": ("prompts", "points"),
            "mask_input": ("prompts", 1, m, m),
            "has_mask_input": ("prompts",),
        },
        outputs={"low_res_masks": ("prompts", k, m, m), "iou_predictions": ("prompts", k)},
        tolerances={
            "low_res_masks": Tolerance(atol=1e-4, rtol=1e-4),
            "iou_predictions": Tolerance(atol=1e-4, rtol=1e-4),
        },
    )


class SamInterfaceDecoder(nn.Module):
    """Meta's official ``SamOnnxModel`` (``orig_im_size`` in, ``masks`` out), for existing SAM
    ONNX clients. ``model`` needs ``image_encoder.img_size``, as every SAM family has."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from segment_anything.utils.onnx import SamOnnxModel

        if not hasattr(model, "mask_threshold"):
            model.mask_threshold = 0.0
        self.inner = SamOnnxModel(model, return_single_mask=False)
        self.inner.mask_postprocessing = self.mask_postprocessing

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Meta's postprocessing with the padding crop written as index_select over arange.

        Upstream slices ``masks[..., :h, :w]`` with tensor bounds, which today's tracer freezes
        to the example's size: the exported graph then crops every image like the example.
        """
        size = self.inner.img_size
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        kept = self.inner.resize_longest_image_size(orig_im_size, size)
        masks = masks.index_select(2, torch.arange(kept[0])).index_select(3, torch.arange(kept[1]))
        height, width = orig_im_size.to(torch.int64)[0], orig_im_size.to(torch.int64)[1]
        return F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input,
                orig_im_size):
        return self.inner(image_embeddings, point_coords, point_labels, mask_input,
                          has_mask_input, orig_im_size)


def sam_interface_spec(card: ModelCard) -> GraphSpec:
    emb, m, k = card.embedding_shape, card.preprocessing.mask_size, card.num_mask_tokens
    return GraphSpec(
        "decoder_sam",
        inputs={
            "image_embeddings": (1, *emb),
            "point_coords": (1, "num_points", 2),
            "point_labels": (1, "num_points"),
            "mask_input": (1, 1, m, m),
            "has_mask_input": (1,),
            "orig_im_size": (2,),
        },
        outputs={
            "masks": (1, k, "height", "width"),
            "iou_predictions": (1, k),
            "low_res_masks": (1, k, m, m),
        },
        tolerances={
            "masks": Tolerance(atol=1e-3, rtol=1e-3),
            "iou_predictions": Tolerance(atol=1e-4, rtol=1e-4),
            "low_res_masks": Tolerance(atol=1e-4, rtol=1e-4),
        },
    )
