"""Architecture inference from checkpoint tensors, shared by the adaptation loaders.

Upstream adaptation checkpoints carry no config: SAMed and MA-SAM save adapters plus the decoder,
Med-SA a whole model built from command-line flags. Every size the rebuilt modules need is read
from tensor shapes here, and an explicit keyword wins where the shapes are silent or ambiguous
(head count without rel-pos tensors, image size when the rel-pos length does not follow it).

What the shapes say (standard SAM key names, ``image_encoder.blocks.{i}.attn.*``):
- width C and patch p: ``patch_embed.proj.weight`` (C, 3, p, p); depth: the block indices.
- head dim hd: the second dim of ``rel_pos_h`` / ``rel_h`` (heads = C / hd).
- global blocks: rel-pos length != 2·window−1 (windowed blocks have 27 at window 14).
- image size: global rel-pos length 2·(S/p)−1, or ``pos_embed`` (1, S/p, S/p, C) where the family
  stores it at the input size (SAM, SAMed/MA-SAM bases; not Med-SA, whose pos_embed is always 64²).
- decoder: mask tokens, MLP width, IoU head, upscaler stages and hypernetwork width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from samedge.errors import CheckpointError, KeyMismatchError
from samedge.models.checkpoint import guess_family
from samedge.models.sam import SAM_VARIANTS, SamConfig

BLOCK_KEY = re.compile(r"image_encoder\.blocks\.(\d+)\.")
REL_POS_KEY = re.compile(r"image_encoder\.blocks\.(\d+)\.attn\.(?:rel_pos_h|rel_h)$")
SAM_WINDOW = 14
DECODER_HEADS = 8  # every upstream family keeps SAM's 8 decoder heads; shapes cannot tell


def looks_like(state: dict[str, torch.Tensor]) -> str:
    """:func:`guess_family` plus the adaptation layouts it does not name."""
    keys = set(state)
    if any(re.fullmatch(r"(sa|cti|cit)_a_\d{3}", k) for k in keys):
        return "SAMed_s LoRA parameters (encoder w_a_/w_b_ plus decoder sa_/cti_/cit_/fati_)"
    if any(k.endswith("attn.qkv.lora_A") for k in keys):
        return "Med-SA sam_lora model (loralib lora_A/lora_B on qkv and mlp)"
    if any(".prompt_generator." in k for k in keys):
        return "SAM-Adapter (Chen et al.) model with a prompt_generator"
    if any(k.startswith("image_encoder.ImageEncoderViT.") for k in keys):
        return "MA-SAM 3D adapters (image_encoder.ImageEncoderViT.blocks.*.Block.adapter_*)"
    return guess_family(state)


def block_indices(state: dict[str, torch.Tensor], pattern: re.Pattern = BLOCK_KEY) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _known_variant(width: int, depth: int) -> SamConfig | None:
    for config in SAM_VARIANTS.values():
        if (config.embed_dim, config.depth) == (width, depth):
            return config
    return None


def infer_encoder(
    state: dict[str, torch.Tensor],
    *,
    what: str,
    image_size: int | None = None,
    num_heads: int | None = None,
    global_attn_indexes: tuple[int, ...] | None = None,
    window_size: int = SAM_WINDOW,
    size_from_rel_pos: bool = True,
    size_from_pos_embed: bool = True,
) -> SamConfig:
    """The ViT hyper-parameters of a standard-named image encoder state dict.

    ``size_from_rel_pos`` / ``size_from_pos_embed`` say whether this layout stores those tensors at
    the input size (Med-SA's sam_lora keeps global rel-pos at 127 and pos_embed at 64² for any size).
    Decoder fields of the returned config keep SAM's defaults; callers replace them.
    """
    proj = state.get("image_encoder.patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise CheckpointError(
            f"{what} has no image encoder (no image_encoder.patch_embed.proj.weight); it looks "
            f"like {looks_like(state)}",
            hint="pass the checkpoint that contains the SAM image encoder",
        )
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    blocks = block_indices(state)
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{what}: image encoder blocks are missing or not contiguous: {blocks}")
    depth = len(blocks)
    known = _known_variant(width, depth)

    rel = {int(m.group(1)): state[k] for k in state if (m := REL_POS_KEY.match(k))}
    if rel and set(rel) != set(blocks):
        raise CheckpointError(f"{what}: rel-pos tensors only in blocks {sorted(rel)} of {depth}")
    windowed_length = 2 * window_size - 1
    lengths = {i: int(t.shape[0]) for i, t in rel.items()}

    if num_heads is None:
        if rel:
            head_dim = int(next(iter(rel.values())).shape[1])
            if width % head_dim:
                raise KeyMismatchError(f"{what}: rel-pos head dim {head_dim} does not divide width {width}")
            num_heads = width // head_dim
        elif known is not None:
            num_heads = known.num_heads
        else:
            raise CheckpointError(
                f"{what} has no rel-pos tensors and width {width}/depth {depth} is not a SAM "
                "variant, so the head count cannot be read from its shapes",
                hint="pass num_heads=",
            )
    if global_attn_indexes is None:
        differing = tuple(i for i in blocks if lengths.get(i, windowed_length) != windowed_length)
        if differing or known is None:
            global_attn_indexes = differing
        else:  # no rel-pos, or the global length equals the window's: only the variant tells
            global_attn_indexes = known.global_attn_indexes
    global_attn_indexes = tuple(global_attn_indexes)

    if image_size is None:
        global_lengths = {lengths[i] for i in global_attn_indexes if i in lengths}
        pos = state.get("image_encoder.pos_embed")
        if size_from_rel_pos and len(global_lengths) == 1:
            image_size = (next(iter(global_lengths)) + 1) // 2 * patch
        elif size_from_pos_embed and pos is not None and pos.ndim == 4:
            image_size = int(pos.shape[1]) * patch
        else:
            raise CheckpointError(
                f"{what}: the input size cannot be read from its tensors (no global rel-pos "
                "that follows it)",
                hint="pass image_size= (the -image_size the model was trained with)",
            )
    return SamConfig(
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        global_attn_indexes=global_attn_indexes,
        image_size=image_size,
        patch_size=patch,
        window_size=window_size,
    )


@dataclass(frozen=True)
class DecoderShape:
    """Everything a SAM-style mask decoder needs, as read from its tensors."""

    prompt_dim: int
    num_mask_tokens: int
    transformer_depth: int
    mlp_dim: int
    iou_hidden: int
    iou_depth: int
    upscale_stages: int  # 2 in SAM (4× the token grid), 4 in MA-SAM (16×, full resolution)
    hyper_dim: int  # channels of the last upscaler stage = hypernetwork MLP output
    transformer_style: Literal["sam", "medsa"]  # Med-SA ≥ 2024-01-03 uses EfficientSAM's blocks


def infer_decoder(state: dict[str, torch.Tensor], what: str) -> DecoderShape:
    p = "mask_decoder."
    tokens = state.get(p + "mask_tokens.weight")
    if tokens is None:
        raise CheckpointError(
            f"{what} has no mask decoder (no mask_decoder.mask_tokens.weight); it looks like "
            f"{looks_like(state)}"
        )
    layers = block_indices(state, re.compile(r"mask_decoder\.transformer\.layers\.(\d+)\."))
    if f"{p}transformer.layers.0.mlp.lin1.weight" in state:
        style, mlp = "sam", state[f"{p}transformer.layers.0.mlp.lin1.weight"]
    elif f"{p}transformer.layers.0.mlp.layers.0.0.weight" in state:
        style, mlp = "medsa", state[f"{p}transformer.layers.0.mlp.layers.0.0.weight"]
    else:
        style, mlp = "sam", None  # SAMed_s saves no transformer: it comes from the SAM base
    iou = block_indices(state, re.compile(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."))
    convs = [
        k for k, v in state.items()
        if k.startswith(p + "output_upscaling.") and k.endswith(".weight") and v.ndim == 4
    ]
    hyper = state[p + "output_hypernetworks_mlps.0.layers.2.weight"]
    return DecoderShape(
        prompt_dim=int(tokens.shape[1]),
        num_mask_tokens=int(tokens.shape[0]),
        transformer_depth=len(layers) or 2,
        mlp_dim=int(mlp.shape[0]) if mlp is not None else 2048,
        iou_hidden=int(state[p + "iou_prediction_head.layers.0.weight"].shape[0]),
        iou_depth=len(iou),
        upscale_stages=len(convs),
        hyper_dim=int(hyper.shape[0]),
        transformer_style=style,
    )


def upscaler(dim: int, stages: int) -> nn.Sequential:
    """SAM's 2-stage (ConvT, LN2d, GELU, ConvT, GELU) or MA-SAM's 4-stage progressive upscaler.

    Module indices follow upstream (MA-SAM: ``output_upscaling.{0,1,3,4,6,7,9}`` hold weights).
    """
    from segment_anything.modeling.common import LayerNorm2d

    layers: list[nn.Module] = []
    channels = dim
    for stage in range(stages):
        layers.append(nn.ConvTranspose2d(channels, channels // (4 if stage == 0 else 2), 2, 2))
        channels //= 4 if stage == 0 else 2
        if stage < stages - 1:
            layers.append(LayerNorm2d(channels))
        layers.append(nn.GELU())
    return nn.Sequential(*layers)


def mask_decoder_from(shape: DecoderShape, transformer: nn.Module | None = None) -> nn.Module:
    """segment-anything's MaskDecoder sized from ``shape`` (K tokens, upscaler, heads).

    ``transformer`` replaces SAM's TwoWayTransformer (Med-SA passes its EfficientSAM-style one).
    """
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer
    from segment_anything.modeling.mask_decoder import MLP

    if transformer is None:
        transformer = TwoWayTransformer(
            depth=shape.transformer_depth, embedding_dim=shape.prompt_dim,
            mlp_dim=shape.mlp_dim, num_heads=DECODER_HEADS,
        )
    decoder = MaskDecoder(
        num_multimask_outputs=shape.num_mask_tokens - 1,
        transformer=transformer,
        transformer_dim=shape.prompt_dim,
        iou_head_depth=shape.iou_depth,
        iou_head_hidden_dim=shape.iou_hidden,
    )
    if shape.upscale_stages != 2:
        decoder.output_upscaling = upscaler(shape.prompt_dim, shape.upscale_stages)
        decoder.output_hypernetworks_mlps = nn.ModuleList(
            MLP(shape.prompt_dim, shape.prompt_dim, shape.hyper_dim, 3)
            for _ in range(shape.num_mask_tokens)
        )
    return decoder


def prompt_encoder_for(config: SamConfig, prompt_dim: int) -> nn.Module:
    from segment_anything.modeling import PromptEncoder

    grid = config.grid
    return PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=16,
    )


def variant_name(config: SamConfig) -> str:
    """``vit_b``/``vit_l``/``vit_h`` when the encoder is one of SAM's, else ``custom``."""
    for name, known in SAM_VARIANTS.items():
        if (known.embed_dim, known.depth, known.num_heads, known.global_attn_indexes) == (
            config.embed_dim, config.depth, config.num_heads, config.global_attn_indexes
        ):
            return name
    return "custom"
