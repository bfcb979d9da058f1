"""MA-SAM (cchen-cc/MA-SAM): FacT-TT on q/v, two 3D slice adapters per block, full-res decoder.

Checkpoint (``Fact_tt_Sam.save_parameters``): a flat dict in ``.pth`` with ``q_FacTs_{i:03d}`` /
``v_FacTs_{i:03d}`` (r, r) per block, the shared ``image_encoder.FacTu.weight`` (r, C) and
``image_encoder.FacTv.weight`` (C, r), every ``.adapter_`` tensor under
``image_encoder.ImageEncoderViT.blocks.{i}.Block.`` (linear_down (384, C), conv (384, 384, 3, 1, 1)
+ bias, linear_up (C, 384), norm; plus the ``_2`` twins), and all ``prompt_encoder.*`` /
``mask_decoder.*`` tensors (K+1 tokens, 4-stage upscaler, 8-channel hypernetworks).

The frozen encoder comes from the SAM checkpoint with SAMed's ``load_from`` resizes (global blocks
by index). The FacT scale ``s`` (``--scale``, 1.0 in the released scripts) is not saved and is a
keyword here. The encoder takes D adjacent slices as its batch (released BTCV model: D = 5).
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from samedge.errors import FamilyMismatchError, KeyMismatchError
from samedge.models.card import ModelCard
from samedge.models.checkpoint import file_sha256, load_into, load_state_dict
from samedge.models.family import (
    BASE,
    CHECKPOINT,
    DEPTH,
    IMAGE_SIZE,
    NUM_CLASSES,
    RANK,
    Family,
    Option,
)
from samedge.models.folding import fold_qv, folded_attention, low_rank, token_grid
from samedge.models.infer import (
    infer_decoder,
    infer_encoder,
    looks_like,
    mask_decoder_from,
    prompt_encoder_for,
    variant_name,
)
from samedge.models.sam import SamConfig
from samedge.models.samed import read_sam_base, samed_load_from, semantic_forward
from samedge.models.vit_blocks import Encoder, SamParts, SliceAdapter, SliceAdapterBlock
from samedge.runtime.transforms import Preprocessing

MASAM_CT_WINDOW = (25.0, 450.0)  # HU clip [-200, 250] (test.py HU_min/HU_max)
MASAM_DATA_MEAN, MASAM_DATA_STD = 50.21997497685108, 68.47153712416372  # test.py data_mean/std
ADAPTER_CHANNELS = 384
ENCODER = "image_encoder.ImageEncoderViT."


class FactQKV(nn.Module):
    """MA-SAM's ``_Fact_tt_qkv``: ``qkv(x)`` plus ``s·V(Σq(U x))`` / ``s·V(Σv(U x))`` added in place
    to the q / v columns (dropout 0.1 is inactive at inference)."""

    def __init__(self, qkv: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.qkv, self.dim, self.s = qkv, qkv.in_features, scale
        self.q_FacTs = nn.Linear(rank, rank, bias=False)
        self.v_FacTs = nn.Linear(rank, rank, bias=False)
        self.dp_q, self.dp_v = nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, x, fact_u: nn.Linear, fact_v: nn.Linear):
        qkv = self.qkv(x)
        new_q = fact_v(self.dp_q(self.q_FacTs(fact_u(x))))
        new_v = fact_v(self.dp_v(self.v_FacTs(fact_u(x))))
        qkv[:, :, :, : self.dim] += new_q * self.s
        qkv[:, :, :, -self.dim:] += new_v * self.s
        return qkv


class FactAttention(nn.Module):
    """``_Fact_tt_Attention``: SAM's attention, with the FacT qkv (einsum rel-pos as upstream)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.Attention = attention

    def forward(self, x, fact_u, fact_v):
        from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

        a = self.Attention
        batch, h, w, _ = x.shape
        qkv = a.qkv(x, fact_u, fact_v).reshape(batch, h * w, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * a.num_heads, h * w, -1).unbind(0)
        attn = (q * a.scale) @ k.transpose(-2, -1)
        attn = add_decomposed_rel_pos(attn, q, a.rel_pos_h, a.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(batch, a.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(batch, h, w, -1)
        return a.proj(x)


def _adapter(block: nn.Module, x: torch.Tensor, suffix: str, d_size: int) -> torch.Tensor:
    """One MA-SAM 3D adapter, line for line: LN, down, view (B/D, D, H', H', 384), Conv3d, up."""
    b_size, hw_size = x.shape[0], x.shape[1]
    channels = block.adapter_channels
    x = getattr(block, "adapter_linear_down" + suffix)(getattr(block, "adapter_norm" + suffix)(x))
    x = x.contiguous().view(int(b_size / d_size), d_size, hw_size, hw_size, channels)
    x = getattr(block, "adapter_conv" + suffix)(torch.permute(x, (0, -1, 1, 2, 3)))
    x = torch.permute(x, (0, 2, 3, 4, 1)).contiguous().view(b_size, hw_size, hw_size, channels)
    return getattr(block, "adapter_linear_up" + suffix)(getattr(block, "adapter_act" + suffix)(x))


class FactBlock(nn.Module):
    """``_Fact_tt_Block``: adapter, windowed FacT attention, adapter ``_2``, MLP."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.Block = block

    def forward(self, x, fact_u, fact_v, d_size: int):
        from segment_anything.modeling.image_encoder import (
            window_partition,
            window_unpartition,
        )

        blk = self.Block
        x = x + _adapter(blk, x, "", d_size)
        shortcut = x
        x = blk.norm1(x)
        if blk.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, blk.window_size)
        x = blk.attn(x, fact_u, fact_v)
        if blk.window_size > 0:
            x = window_unpartition(x, blk.window_size, pad_hw, (h, w))
        x = shortcut + x
        x = x + _adapter(blk, x, "_2", d_size)
        return x + blk.mlp(blk.norm2(x))


class FactEncoder(nn.Module):
    """``_Fact_tt_ImageEncoderViT`` with ``d_size`` fixed at build (the slices are the batch)."""

    def __init__(self, vit: nn.Module, rank: int, depth: int):
        super().__init__()
        width = vit.patch_embed.proj.out_channels
        self.ImageEncoderViT = vit
        self.FacTu = nn.Linear(width, rank, bias=False)
        self.FacTv = nn.Linear(rank, width, bias=False)
        self.img_size, self.depth = vit.img_size, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.ImageEncoderViT
        x = vit.patch_embed(x) + vit.pos_embed
        for block in vit.blocks:
            x = block(x, self.FacTu, self.FacTv, self.depth)
        return vit.neck(x.permute(0, 3, 1, 2))


def masam_reference(config: SamConfig, decoder_shape, rank: int, scale: float, depth: int,
                    channels: int = ADAPTER_CHANNELS) -> SamParts:
    """MA-SAM's Sam after ``Fact_tt_Sam`` surgery: same module tree and key names as upstream."""
    from segment_anything.modeling import ImageEncoderViT

    norm = partial(nn.LayerNorm, eps=1e-6)
    vit = ImageEncoderViT(
        depth=config.depth, embed_dim=config.embed_dim, img_size=config.image_size, mlp_ratio=4,
        norm_layer=norm, num_heads=config.num_heads, patch_size=config.patch_size, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=list(config.global_attn_indexes),
        window_size=config.window_size, out_chans=decoder_shape.prompt_dim,
    )
    dim = config.embed_dim
    for i, block in enumerate(vit.blocks):
        block.adapter_channels = channels
        for suffix in ("", "_2"):
            setattr(block, "adapter_linear_down" + suffix, nn.Linear(dim, channels, bias=False))
            setattr(block, "adapter_linear_up" + suffix, nn.Linear(channels, dim, bias=False))
            setattr(block, "adapter_conv" + suffix,
                    nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding="same"))
            setattr(block, "adapter_act" + suffix, nn.GELU())
            setattr(block, "adapter_norm" + suffix, norm(dim))
        block.attn.qkv = FactQKV(block.attn.qkv, rank, scale)
        block.attn = FactAttention(block.attn)
        vit.blocks[i] = FactBlock(block)
    encoder = FactEncoder(vit, rank, depth)
    return SamParts(encoder, prompt_encoder_for(config, decoder_shape.prompt_dim),
                    mask_decoder_from(decoder_shape))


def to_upstream_name(key: str) -> str:
    """A plain SAM key → its name inside the FacT-wrapped MA-SAM model."""
    if not key.startswith("image_encoder."):
        return key
    key = ENCODER + key[len("image_encoder."):]
    key = re.sub(r"(blocks\.\d+)\.", r"\1.Block.", key)
    key = key.replace(".attn.", ".attn.Attention.")
    return re.sub(r"\.attn\.Attention\.qkv\.", ".attn.Attention.qkv.qkv.", key)


def from_upstream_name(key: str) -> str:
    """Inverse of :func:`to_upstream_name` (the name MA-SAM's ``load_from`` sees before wrapping)."""
    key = re.sub(r"\.qkv\.qkv\.", ".qkv.", key.replace(ENCODER, "image_encoder."))
    return key.replace(".Block.", ".").replace(".attn.Attention.", ".attn.")


def read_masam(path: str | Path) -> dict[str, torch.Tensor]:
    state = load_state_dict(path, "MA-SAM checkpoint")
    if "image_encoder.FacTu.weight" not in state or "image_encoder.FacTv.weight" not in state:
        raise FamilyMismatchError(
            f"{path} is not an MA-SAM checkpoint (no image_encoder.FacTu/FacTv.weight); it looks "
            f"like {looks_like(state)}",
            hint="use the family that matches the file (samed, medsa, sam ...)",
        )
    return state


def _check_fits(state: dict, base_config: SamConfig, rank: int | None, path) -> tuple[int, int]:
    u = state["image_encoder.FacTu.weight"]
    r, width = int(u.shape[0]), int(u.shape[1])
    blocks = sorted(int(k[-3:]) for k in state if re.fullmatch(r"q_FacTs_\d{3}", k))
    if width != base_config.embed_dim or blocks != list(range(base_config.depth)):
        raise FamilyMismatchError(
            f"MA-SAM checkpoint {path} has image_encoder.FacTu.weight {tuple(u.shape)} and "
            f"q_FacTs for {len(blocks)} blocks, but the base encoder is width "
            f"{base_config.embed_dim}, depth {base_config.depth} ({variant_name(base_config)})",
            hint="pass the SAM checkpoint MA-SAM was trained on as base (released model: vit_h)",
        )
    if rank is not None and rank != r:
        raise KeyMismatchError(f"MA-SAM checkpoint {path} has FacT rank {r}, not {rank}")
    down = state.get(ENCODER + "blocks.0.Block.adapter_linear_down.weight")
    if down is None:
        raise KeyMismatchError(f"MA-SAM checkpoint {path} has no 3D adapters "
                               f"({ENCODER}blocks.0.Block.adapter_linear_down.weight)")
    return r, int(down.shape[0])


def masam_preprocessing(image_size: int) -> Preprocessing:
    """MA_SAM/test.py: HU window → ×255/450 → float32 standardised with the BTCV mean/std →
    min-max over the slice stack → zoom (order 3) only where the slice is not the input size;
    labels: softmax zoomed back with order 3, argmax."""
    return Preprocessing(
        image_size=image_size, resize="stretch", interpolation="spline3",
        normalize="standardize_minmax", pixel_mean=(MASAM_DATA_MEAN,) * 3,
        pixel_std=(MASAM_DATA_STD,) * 3, normalize_stage="before_resize", minmax_scope="stack",
        round_resized=False, source="float", mask_size=image_size, ct_window=MASAM_CT_WINDOW,
        mask_resize="probabilities", mask_interpolation="spline3",
    )


def build_masam(
    base: str | Path,
    checkpoint: str | Path,
    depth: int = 5,
    image_size: int = 512,
    num_classes: int | None = None,
    rank: int | None = None,
    scale: float = 1.0,
    merged: bool = True,
) -> ModelCard:
    """MA-SAM from Meta's SAM checkpoint (``base``) and the FacT/adapter file.

    The encoder takes (depth, 3, S, S): ``depth`` adjacent slices (5 for the released BTCV model,
    slices i−2..i+2) and returns one embedding per slice; the decoder returns K+1 logit maps at the
    full input resolution per slice. ``card.model`` is merged; ``card.reference`` upstream-faithful.
    """
    base_state = read_sam_base(base)
    state = read_masam(checkpoint)
    base_config = infer_encoder(base_state, what=f"SAM base {base}")
    r, channels = _check_fits(state, base_config, rank, checkpoint)
    shape = infer_decoder(state, f"MA-SAM checkpoint {checkpoint}")
    if num_classes is not None and num_classes + 1 != shape.num_mask_tokens:
        raise KeyMismatchError(
            f"MA-SAM checkpoint {checkpoint} has {shape.num_mask_tokens} mask tokens "
            f"(mask_decoder.mask_tokens.weight), i.e. {shape.num_mask_tokens - 1} classes, "
            f"not num_classes={num_classes}", hint="leave num_classes unset")
    config = replace(base_config, image_size=image_size, prompt_dim=shape.prompt_dim,
                     num_multimask_outputs=shape.num_mask_tokens - 1)
    reference = masam_reference(config, shape, r, scale, depth, channels)
    plain_keys = [from_upstream_name(k) for k in reference.state_dict()]
    loaded = samed_load_from(plain_keys, base_state, image_size, config.patch_size, "index",
                             config.global_attn_indexes)
    full = {to_upstream_name(k): v for k, v in loaded.items()}
    for k, v in state.items():
        if m := re.fullmatch(r"([qv])_FacTs_(\d{3})", k):
            full[f"{ENCODER}blocks.{int(m.group(2))}.Block.attn.Attention.qkv.{m.group(1)}_FacTs.weight"] = v
        elif k.startswith(("prompt_encoder.", "mask_decoder.", "image_encoder.")):
            full[k] = v
    load_into(reference, full, f"MA-SAM ({variant_name(base_config)}, image {image_size}, rank {r})")
    reference.eval()


    model = merge_masam(reference) if merged else reference
    pre = masam_preprocessing(image_size)
    return ModelCard(
        "masam", variant_name(base_config), model, pre, prompt="none", multimask_default=True,
        decoder="semantic", depth=depth, reference=reference,
        checkpoint={"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint),
                    "base": str(Path(base).resolve()), "base_sha256": file_sha256(base),
                    "rank": r, "scale": scale},
        notes=[
            f"encoder input: {depth} adjacent slices (i-{depth // 2}..i+{depth // 2}, edges "
            "replicated) as the batch; one embedding and K+1 full-resolution logit maps per slice",
            f"semantic decoder: {shape.num_mask_tokens} channels (0 = background); upstream "
            "averages softmax over overlapping windows, then argmax",
            "input = CT clipped to [-200, 250] HU, ×255/450, standardised with the BTCV mean/std, "
            "min-max over the slice stack, then zoomed with scipy order 3 where not the input size",
            "per-slice labels: softmax zoomed back with order 3, argmax",
            f"FacT scale s={scale} is not stored in the checkpoint (upstream --scale, default 1.0)",
        ],
    )


@torch.no_grad()
def reference_forward(card_or_model: ModelCard | nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Upstream MA-SAM inference on (B·D, 3, S, S) (b-major, as ``view(-1, 3, H, W)`` of (b, d))."""
    model = card_or_model.reference if isinstance(card_or_model, ModelCard) else card_or_model
    return semantic_forward(model, images)


# -- merge: fold the linear updates into the frozen weights -------------------------------------
def merge_masam(reference: SamParts) -> SamParts:
    """MA-SAM: FacT folded into qkv; the two slice adapters per block kept (Conv3d over D)."""
    fact = reference.image_encoder
    vit, depth = fact.ImageEncoderViT, fact.depth
    u, v = fact.FacTu.weight, fact.FacTv.weight.detach().double()
    grid = token_grid(vit)
    blocks = []
    for wrapped in vit.blocks:
        blk = wrapped.Block
        a = blk.attn.Attention
        fq = a.qkv
        qkv = fold_qv(fq.qkv, fq.s * (v @ low_rank(fq.q_FacTs.weight, u)),
                      fq.s * (v @ low_rank(fq.v_FacTs.weight, u)))
        attn = folded_attention(qkv, a.proj, a.num_heads, (a.rel_pos_h, a.rel_pos_w), blk.window_size, grid)
        adapters = [
            SliceAdapter(getattr(blk, "adapter_norm" + s), getattr(blk, "adapter_linear_down" + s),
                         getattr(blk, "adapter_conv" + s), getattr(blk, "adapter_linear_up" + s),
                         depth, grid)
            for s in ("", "_2")
        ]
        blocks.append(SliceAdapterBlock(blk.norm1, attn, blk.norm2, blk.mlp, blk.window_size, grid,
                                        *adapters))
    encoder = Encoder(vit.patch_embed, vit.pos_embed, blocks, vit.neck, vit.img_size, depth)
    return SamParts(encoder, reference.prompt_encoder, reference.mask_decoder)


FAMILY = Family(
    name="masam",
    summary="MA-SAM: FacT low-rank updates plus 3D adapters over adjacent slices",
    build=build_masam,
    options=(BASE, CHECKPOINT, IMAGE_SIZE, NUM_CLASSES, DEPTH, RANK,
             Option("scale", "MA-SAM FacT scale s (upstream --scale, default 1.0; not stored in "
                             "the checkpoint, so pass what the model was trained with)", float)),
    decoder_graph="semantic",
    merge=merge_masam,
)
