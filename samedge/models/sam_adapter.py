"""SAM-Adapter (tianrun-chen/SAM-Adapter-PyTorch): SAM's ViT with a prompt generator, prompt-free.

Checkpoint (``train.py``'s ``torch.save(model.state_dict())`` of its ``SAM`` module, loaded by
``test.py`` with ``strict=True``): one flat dict of the whole model at its training size —
``image_encoder.*`` (SAM's ViT, frozen, plus ``image_encoder.prompt_generator.*``:
``embedding_generator`` (C/32, C), ``shared_mlp`` (C, C/32), ``lightweight_mlp_{i}.0`` (C/32, C/32)
per block, ``prompt_generator.proj`` (C/32, 3, 16, 16), each with its bias), ``mask_decoder.*``
(SAM's, 4 mask tokens), ``pe_layer.positional_encoding_gaussian_matrix`` and
``no_mask_embed.weight`` — there is no prompt encoder. Configs ship ViT-B, ViT-L and ViT-H
(``cod-sam-vit-{b,l,h}.yaml``; the released model is the ViT-H ``demo.yaml``), all at 1024².
``ImageEncoderViT`` hard-codes ``freq_nums`` 0.25 and ``scale_factor`` 32 (the yaml values are
not read); sizes come from the tensors here.

Forward (``ImageEncoderViT.forward``): tokens = patch_embed(x); embedding = embedding_generator of
the tokens *reshaped* (B, H, W, C) → (B, C, HW) → permuted (upstream's ``init_embeddings``: a
reshape, not a transpose, so channels and positions interleave — reproduced); handcrafted =
``prompt_generator.proj`` of the FFT high-pass of the input (``models/highpass.py``); block i
adds ``shared_mlp(lightweight_mlp_i(handcrafted + embedding))`` to its input. Decoding
(``SAM.infer``): empty sparse prompt, ``no_mask_embed``, ``multimask_output=False`` (mask token
0), bilinear to the input size, ``sigmoid > 0.5`` in ``test.py``'s metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samedge.errors import FamilyMismatchError
from samedge.models.card import ModelCard
from samedge.models.checkpoint import file_sha256, load_into, load_state_dict
from samedge.models.family import CHECKPOINT, Family
from samedge.models.folding import folded_attention, token_grid
from samedge.models.highpass import HighPass, upstream_highpass
from samedge.models.infer import (
    DecoderShape,
    infer_decoder,
    infer_encoder,
    looks_like,
    mask_decoder_from,
    variant_name,
)
from samedge.models.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, SamConfig, vit_encoder
from samedge.models.vit_blocks import Block, Encoder, SamParts
from samedge.runtime.transforms import Preprocessing

FREQ_NUMS = 0.25  # ImageEncoderViT.__init__: self.freq_nums = 0.25 (input_type 'fft')
PROMPT = "image_encoder.prompt_generator."


class PatchEmbed2(nn.Module):
    """Upstream's ``PatchEmbed2``: a patch-sized, patch-strided convolution (no permute)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (self.img_size, self.img_size), "input size differs from the model's"
        return self.proj(x)


class PromptGenerator(nn.Module):
    """Upstream's ``PromptGenerator`` for ``input_type='fft'``, ``handcrafted_tune`` and
    ``embedding_tune`` on (the only path its ``ImageEncoderViT`` takes), names and order kept."""

    def __init__(self, embed_dim: int, hidden: int, depth: int, img_size: int, patch_size: int,
                 freq_nums: float = FREQ_NUMS):
        super().__init__()
        self.depth, self.freq_nums = depth, freq_nums
        self.shared_mlp = nn.Linear(hidden, embed_dim)
        self.embedding_generator = nn.Linear(embed_dim, hidden)
        for i in range(depth):
            setattr(self, f"lightweight_mlp_{i}", nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()))
        self.prompt_generator = PatchEmbed2(img_size, patch_size, 3, hidden)

    def init_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.permute(0, 3, 1, 2).shape
        return self.embedding_generator(x.reshape(n, c, h * w).permute(0, 2, 1))

    def init_handcrafted(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompt_generator(upstream_highpass(x, self.freq_nums))

    def get_prompt(self, handcrafted: torch.Tensor, embedding: torch.Tensor) -> list[torch.Tensor]:
        n, c, h, w = handcrafted.shape
        handcrafted = handcrafted.view(n, c, h * w).permute(0, 2, 1)
        return [self.shared_mlp(getattr(self, f"lightweight_mlp_{i}")(handcrafted + embedding))
                for i in range(self.depth)]


class AdapterViT(nn.Module):
    """Upstream's ``ImageEncoderViT``: segment-anything's ViT parts (the same code upstream
    copies) under the same names, plus ``prompt_generator`` and its forward."""

    def __init__(self, vit: nn.Module, prompt_generator: PromptGenerator):
        super().__init__()
        self.img_size = vit.img_size
        self.patch_embed, self.pos_embed, self.blocks, self.neck = (
            vit.patch_embed, vit.pos_embed, vit.blocks, vit.neck)
        self.prompt_generator = prompt_generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x
        x = self.patch_embed(x)
        embedding_feature = self.prompt_generator.init_embeddings(x)
        handcrafted_feature = self.prompt_generator.init_handcrafted(inp)
        prompt = self.prompt_generator.get_prompt(handcrafted_feature, embedding_feature)
        x = x + self.pos_embed
        b, h, w = x.shape[0], x.shape[1], x.shape[2]
        for i, blk in enumerate(self.blocks):
            x = blk(prompt[i].reshape(b, h, w, -1) + x)
        return self.neck(x.permute(0, 3, 1, 2))


def foreground_logits(low_res: torch.Tensor) -> torch.Tensor:
    """(N, 1, m, m) mask logits → (N, 2, m, m) [0, logit]: argmax is upstream's ``sigmoid > 0.5``
    and softmax its sigmoid, so the semantic runtime (label maps) serves this binary model."""
    return torch.cat([torch.zeros_like(low_res), low_res], dim=1)


def _decode(mask_decoder: nn.Module, embeddings: torch.Tensor, dense_pe: torch.Tensor,
            no_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``SAM.infer``'s decoding: one (batch 1) empty sparse prompt, the no-mask dense prompt,
    ``multimask_output=False``; returns :func:`foreground_logits` and mask 0's predicted IoU."""
    dim, h, w = dense_pe.shape[1:]
    sparse = torch.empty((1, 0, dim), device=embeddings.device)
    dense = no_mask.reshape(1, -1, 1, 1).expand(1, -1, h, w)
    low_res, iou = mask_decoder(image_embeddings=embeddings, image_pe=dense_pe,
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)
    return foreground_logits(low_res), iou


class SamAdapter(nn.Module):
    """Upstream's ``SAM`` module at inference: the state-dict layout the checkpoint is in."""

    def __init__(self, image_encoder: AdapterViT, mask_decoder: nn.Module, prompt_dim: int):
        super().__init__()
        from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

        self.image_encoder, self.mask_decoder = image_encoder, mask_decoder
        self.pe_layer = PositionEmbeddingRandom(prompt_dim // 2)
        self.no_mask_embed = nn.Embedding(1, prompt_dim)
        self.grid = token_grid(image_encoder)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer((self.grid, self.grid)).unsqueeze(0)

    def prompt_free_decode(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _decode(self.mask_decoder, embeddings, self.get_dense_pe(), self.no_mask_embed.weight)


def sam_adapter_reference(config: SamConfig, shape: DecoderShape, hidden: int) -> SamAdapter:
    """Upstream's model for these sizes (``models/sam.py`` ``SAM.__init__``), random weights."""
    vit = vit_encoder(config, shape.prompt_dim)
    generator = PromptGenerator(config.embed_dim, hidden, config.depth, config.image_size,
                                config.patch_size)
    return SamAdapter(AdapterViT(vit, generator), mask_decoder_from(shape), shape.prompt_dim)


def read_sam_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    state = load_state_dict(path, "SAM-Adapter checkpoint")
    if PROMPT + "embedding_generator.weight" not in state:
        raise FamilyMismatchError(
            f"{path} is not a SAM-Adapter model (no {PROMPT}embedding_generator.weight); it "
            f"looks like {looks_like(state)}",
            hint="pass model_epoch_best.pth / model_epoch_last.pth as train.py saves it, or use "
                 "the family that matches the file",
        )
    return state


# -- merged (exportable) model --------------------------------------------------------------------
class PromptedEncoder(Encoder):
    """Upstream's encoder with every per-call computation exportable: the FFT high-pass as
    :class:`~samedge.models.highpass.HighPass` MatMuls, rel-pos tables baked, static reshapes."""

    def __init__(self, vit: AdapterViT, blocks: list[nn.Module]):
        super().__init__(vit.patch_embed, vit.pos_embed, blocks, vit.neck, vit.img_size)
        pg = vit.prompt_generator
        self.highpass = HighPass(vit.img_size, vit.img_size, pg.freq_nums)
        self.handcrafted = pg.prompt_generator.proj
        self.embedding_generator, self.shared_mlp = pg.embedding_generator, pg.shared_mlp
        self.lightweight = nn.ModuleList(getattr(pg, f"lightweight_mlp_{i}") for i in range(pg.depth))
        self.grid, self.width = token_grid(vit), pg.embedding_generator.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, c = self.grid, self.width
        tokens = self.patch_embed(x)
        embedding = self.embedding_generator(tokens.reshape(-1, c, g * g).transpose(1, 2))
        handcrafted = self.handcrafted(self.highpass(x)).flatten(2).transpose(1, 2)
        features = handcrafted + embedding
        x = tokens + self.pos_embed
        for mlp, block in zip(self.lightweight, self.blocks):
            x = block(self.shared_mlp(mlp(features)).reshape(-1, g, g, c) + x)
        return self.neck(x.permute(0, 3, 1, 2))


class PromptFree(nn.Module):
    """What SAM-Adapter has of a prompt encoder (``pe_layer``, ``no_mask_embed``) under the names
    the card and the semantic decoder export read (``embed_dim``, ``get_dense_pe`` ...)."""

    def __init__(self, pe_layer: nn.Module, no_mask_embed: nn.Embedding, grid: int):
        super().__init__()
        self.pe_layer, self.no_mask_embed = pe_layer, no_mask_embed
        self.embed_dim, self.image_embedding_size = no_mask_embed.embedding_dim, (grid, grid)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)


class SamAdapterParts(SamParts):
    """The merged model: exportable encoder, :class:`PromptFree`, upstream's decoder."""

    def prompt_free_decode(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.prompt_encoder
        return _decode(self.mask_decoder, embeddings, prompt.get_dense_pe(),
                       prompt.no_mask_embed.weight)


def merge_sam_adapter(reference: SamAdapter) -> SamAdapterParts:
    """Nothing to fold (the prompt MLPs sit behind GELUs): the FFT becomes matrix products and the
    blocks SAM's exportable ones; every weight is shared with the reference."""
    vit = reference.image_encoder
    grid = token_grid(vit)
    blocks = [Block(blk.norm1, folded_attention(blk.attn.qkv, blk.attn.proj, blk.attn.num_heads,
                                                (blk.attn.rel_pos_h, blk.attn.rel_pos_w),
                                                blk.window_size, grid),
                    blk.norm2, blk.mlp, blk.window_size, grid) for blk in vit.blocks]
    prompt = PromptFree(reference.pe_layer, reference.no_mask_embed, grid)
    return SamAdapterParts(PromptedEncoder(vit, blocks), prompt, reference.mask_decoder)


def sam_adapter_preprocessing(image_size: int, mask_size: int) -> Preprocessing:
    """Upstream's ``ValDataset``: ``Resize((S, S))`` on the PIL image (Pillow bilinear, 8-bit),
    ``ToTensor``, ImageNet ``Normalize`` (= SAM's mean/std on the 0–255 scale)."""
    return Preprocessing(
        image_size=image_size, resize="stretch", interpolation="pil_bilinear",
        normalize="mean_std", pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD,
        mask_size=mask_size,
    )


def build_sam_adapter(checkpoint: str | Path) -> ModelCard:
    """SAM-Adapter from its training checkpoint; every size (ViT-B/L/H or custom, input size,
    prompt width) is read from the tensors. ``card.model`` is the exportable model,
    ``card.reference`` upstream's (torch.fft)."""
    state = read_sam_adapter(checkpoint)
    what = f"SAM-Adapter checkpoint {checkpoint}"
    shape = infer_decoder(state, what)
    config = infer_encoder(state, what=what)
    hidden = int(state[PROMPT + "embedding_generator.weight"].shape[0])
    reference = sam_adapter_reference(config, shape, hidden)
    load_into(reference, state, f"SAM-Adapter ({variant_name(config)}, image {config.image_size}, "
                                f"prompt width {hidden})")
    reference.eval()
    return ModelCard(
        "sam_adapter", variant_name(config), merge_sam_adapter(reference),
        sam_adapter_preprocessing(config.image_size, 4 * config.grid), prompt="none",
        decoder="semantic", reference=reference,
        checkpoint={"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint),
                    "prompt_width": hidden, "freq_nums": FREQ_NUMS},
        notes=[
            "binary, prompt-free: 2 logit channels [0, mask token 0] (multimask_output=False), "
            "label 1 = upstream's sigmoid > 0.5",
            "input: PIL bilinear resize to the square input, ImageNet mean/std (= SAM's in 0-255)",
            f"FFT high-pass (freq_nums {FREQ_NUMS}) exported as exact real DFT matrix products",
            "upstream scores masks at the input size against the resized ground truth; samedge "
            "upscales the logits to the original size",
        ],
    )


@torch.no_grad()
def reference_forward(card_or_model: ModelCard | nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``SAM.infer`` on (N, 3, S, S): ``masks`` = mask 0's logits at S (``postprocess_masks``: to
    S, crop to S, to S), ``low_res_logits`` as :func:`foreground_logits`. A card runs its
    reference (torch.fft); a model (reference or merged) runs itself."""
    model = card_or_model.reference if isinstance(card_or_model, ModelCard) else card_or_model
    embeddings = model.image_encoder(images)
    logits, iou = model.prompt_free_decode(embeddings)
    size = model.image_encoder.img_size
    masks = F.interpolate(logits[:, 1:], (size, size), mode="bilinear", align_corners=False)
    return {"embeddings": embeddings, "low_res_logits": logits, "iou_predictions": iou,
            "masks": masks}


FAMILY = Family(
    name="sam_adapter",
    summary="SAM-Adapter (Chen et al.): FFT high-frequency + embedding prompts, binary mask",
    build=build_sam_adapter,
    options=(CHECKPOINT,),
    decoder_graph="binary",
    merge=merge_sam_adapter,
)
