"""Med-SA (KidsWithTokens / SuperMedIntel Medical-SAM-Adapter): SAM with adapters, 2D or 3D.

Checkpoint (``utils.save_checkpoint``): ``{"epoch", "model": "sam", "state_dict", "optimizer",
"best_tol", "path_helper"}`` whose ``state_dict`` is the whole Sam (no ``module.`` prefix).

Encoder (``-mod sam_adpt``, the default): every block has ``Space_Adapter`` (skip, on the
attention output), ``MLP_Adapter`` (parallel to the MLP, ×0.5) and ``Depth_Adapter`` (3D only),
each ``D_fc2(GELU(D_fc1 x))`` with hidden int(0.25·C). ``-mod sam_lora`` instead puts loralib
LoRA (alpha 1 ⇒ scaling 1/r) on qkv (q and v) and on both MLP linears. ``pos_embed`` is always
(1, 64, 64, C) and bicubic-resized to the token grid on every call. Rel-pos parameters come in
three eras: ``rel_pos_h|w`` (loaded from SAM), none, and ``rel_h|w`` (never loaded: zeros).

Decoder (HEAD): ``max(4, n)`` mask tokens, output tokens ``0:n`` (n = ``-multimask_output``,
default 1) whatever the multimask flag says; since 2024-01-03 its TwoWayTransformer is
EfficientSAM's (``mlp.layers.0.0``/``mlp.fc`` keys; its first self-attention keeps a residual, and
later ones add the query PE into the queries themselves, values and residual included), before
that SAM's. Both are read from the keys.

3D (``-thd True -chunk D``): the batch is D slices; each block also attends over the slices of
every token (the leading dim regrouped ``(b d) h w c -> (b h w) d c``, D viewed as the
``closest_numbers(D)`` grid) with the same frozen attention, and adds ``Depth_Adapter`` of that.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from samedge.errors import CheckpointError, FamilyMismatchError, KeyMismatchError
from samedge.models.card import ModelCard
from samedge.models.checkpoint import file_sha256, load_into, load_state_dict
from samedge.models.infer import (
    DECODER_HEADS,
    DecoderShape,
    infer_decoder,
    infer_encoder,
    looks_like,
    prompt_encoder_for,
    variant_name,
)
from samedge.models.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, SamConfig
from samedge.models.vit_blocks import Adapter, SamParts
from samedge.runtime.transforms import Preprocessing

Era = Literal["legacy", "2025"]
MEDSA_3D_CT_WINDOW = (37.5, 425.0)  # MONAI ScaleIntensityRange a_min -175, a_max 250 → [0, 1]
LORA_GLOBAL_GRID = 64  # sam_lora global blocks keep rel-pos for a 64×64 grid at any input size


def closest_numbers(target: int) -> tuple[int, int]:
    """Med-SA's factor pair for viewing D slices as a grid: 96 → (8, 12), 6 → (2, 3), 7 → (1, 7).

    The search starts at (⌊√D⌋, ⌊√D⌋+1), so squares do not give (a, a) (4 → (1, 4)). Upstream
    never returns for D = 1; that is refused here.
    """
    if target < 2:
        raise ValueError(f"Med-SA 3D needs at least 2 slices (closest_numbers({target}) never returns upstream)")
    a = int(target ** 0.5)
    b = a + 1
    while True:
        if a * b == target:
            return a, b
        if a * b < target:
            b += 1
        else:
            a -= 1


# -- loralib, as vendored by Med-SA (models/common/loralib/layers.py) ----------------------------
class LoRAMergedLinear(nn.Linear):
    """``MergedLinear(enable_lora=[True, False, True], lora_alpha=1)``: A (2r, C) and B (2C, r)
    applied as a grouped 1×1 conv and scattered into the q and v columns; saved unmerged."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__(in_features, out_features)
        self.r, self.scaling = r, 1.0 / r
        self.lora_A = nn.Parameter(self.weight.new_zeros((2 * r, in_features)))
        self.lora_B = nn.Parameter(self.weight.new_zeros((out_features // 3 * 2, r)))
        ind = torch.zeros(out_features, dtype=torch.bool).view(3, -1)
        ind[[True, False, True], :] = True
        self.lora_ind = ind.view(-1)

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:
        result = x.new_zeros((*x.shape[:-1], self.out_features)).view(-1, self.out_features)
        result[:, self.lora_ind] = x.reshape(-1, self.out_features // 3 * 2)
        return result.view((*x.shape[:-1], self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, bias=self.bias)
        after_a = F.linear(x, self.lora_A)
        after_b = F.conv1d(after_a.transpose(-2, -1), self.lora_B.unsqueeze(-1), groups=2).transpose(-2, -1)
        return result + self.zero_pad(after_b) * self.scaling


class LoRALinear(nn.Linear):
    """loralib ``Linear(r, lora_alpha=1)``: ``W x + b + (1/r)·B A x``."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__(in_features, out_features)
        self.r, self.scaling = r, 1.0 / r
        self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
        self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, bias=self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


# -- encoder, as upstream (models/ImageEncoder/vit/{adapter,lora}_block.py) -----------------------
class MedSAAttention(nn.Module):
    """Upstream Attention; rel-pos parameters named per era (``rel_h`` / ``rel_pos_h`` / none)."""

    def __init__(self, dim: int, num_heads: int, rel_name: str | None,
                 rel_lengths: tuple[int, int] | None, lora_rank: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = LoRAMergedLinear(dim, 3 * dim, lora_rank) if lora_rank else nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_names = None
        if rel_name is not None:
            self.rel_names = (f"{rel_name}_h", f"{rel_name}_w")
            for name, length in zip(self.rel_names, rel_lengths):
                self.register_parameter(name, nn.Parameter(torch.zeros(length, head_dim)))

    @property
    def rel_pos(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.rel_names is None else tuple(getattr(self, n) for n in self.rel_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

        batch, h, w, n = x.shape
        x = x.reshape(batch, h * w, n)  # sam_lora's MergedLinear needs 3-D input; same values
        qkv = self.qkv(x).reshape(batch, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_names is not None:
            attn = add_decomposed_rel_pos(attn, q, *self.rel_pos, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(batch, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(batch, h, w, -1)
        return self.proj(x)


def _mlp(dim: int, lora_rank: int | None) -> nn.Module:
    from segment_anything.modeling.common import MLPBlock

    mlp = MLPBlock(embedding_dim=dim, mlp_dim=4 * dim)
    if lora_rank:
        mlp.lin1 = LoRALinear(dim, 4 * dim, lora_rank)
        mlp.lin2 = LoRALinear(4 * dim, dim, lora_rank)
    return mlp


class MedSAAdapterBlock(nn.Module):
    """Upstream ``AdapterBlock`` (2D and 3D), einops rearranges written as torch reshapes.

    Note the order upstream uses: windows are cut *before* norm1 (padding tokens are normalised
    too), unlike SAM's block.
    """

    def __init__(self, dim, num_heads, window_size, rel_name, rel_lengths, hidden: int,
                 chunk: int | None, scale: float = 0.5):
        super().__init__()
        norm = nn.LayerNorm
        self.norm1 = norm(dim, eps=1e-6)
        self.attn = MedSAAttention(dim, num_heads, rel_name, rel_lengths)
        self.MLP_Adapter = Adapter(dim, hidden, skip_connect=False)
        self.Space_Adapter = Adapter(dim, hidden)
        self.scale = scale
        self.Depth_Adapter = Adapter(dim, hidden, skip_connect=False)
        self.norm2 = norm(dim, eps=1e-6)
        self.mlp = _mlp(dim, None)
        self.window_size, self.chunk = window_size, chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition

        shortcut = x
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        if self.chunk:  # 3D branch
            hh, ww, c = x.shape[1], x.shape[2], x.shape[3]
            depth = self.chunk
            xd = x.reshape(-1, depth, hh, ww, c).permute(0, 2, 3, 1, 4).reshape(-1, depth, c)
            xd = self.norm1(xd)
            dh, _ = closest_numbers(depth)
            xd = xd.reshape(xd.shape[0], dh, depth // dh, c)
            xd = self.Depth_Adapter(self.attn(xd))
            xd = xd.reshape(-1, hh * ww, dh, depth // dh, c).permute(0, 2, 3, 1, 4).reshape(-1, hh * ww, c)
        x = self.norm1(x)
        x = self.attn(x)
        x = self.Space_Adapter(x)
        if self.chunk:
            x = x + xd.reshape(-1, hh, ww, c)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (height, width))
        x = shortcut + x
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.scale * self.MLP_Adapter(xn)


class MedSALoraBlock(nn.Module):
    """Upstream ``LoraBlock``: SAM's block with loralib qkv and MLP (2D only)."""

    def __init__(self, dim, num_heads, window_size, rel_name, rel_lengths, lora_rank: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MedSAAttention(dim, num_heads, rel_name, rel_lengths, lora_rank)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _mlp(dim, lora_rank)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition

        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (height, width))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class MedSAImageEncoder(nn.Module):
    """Upstream ImageEncoderViT: pos_embed (1, 64, 64, C) bicubic-resized on every call."""

    def __init__(self, config: SamConfig, blocks: list[nn.Module], pos_grid: int, out_chans: int):
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.image_encoder import PatchEmbed

        p, c = config.patch_size, config.embed_dim
        self.img_size, self.depth = config.image_size, 1
        self.patch_embed = PatchEmbed(kernel_size=(p, p), stride=(p, p), in_chans=3, embed_dim=c)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid, pos_grid, c))
        self.blocks = nn.ModuleList(blocks)
        self.neck = nn.Sequential(
            nn.Conv2d(c, out_chans, kernel_size=1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False), LayerNorm2d(out_chans),
        )

    def resized_pos_embed(self, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.pos_embed.permute(0, 3, 1, 2), size=size, mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.resized_pos_embed((x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


# -- decoder, as upstream (models/sam/modeling/mask_decoder.py, models/common/MaskDecoder) -------
class _EffAttention(nn.Module):
    """``AttentionForTwoWayAttentionBlock``: SAM's decoder attention (scale by multiplication)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.embedding_dim, self.internal_dim, self.num_heads = dim, dim // downsample_rate, num_heads
        self.inv_sqrt_c_per_head = 1.0 / math.sqrt(self.internal_dim / num_heads)
        self.q_proj = nn.Linear(dim, self.internal_dim)
        self.k_proj = nn.Linear(dim, self.internal_dim)
        self.v_proj = nn.Linear(dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, dim)

    def _heads(self, x):
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q, k, v):
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = torch.softmax((q @ k.permute(0, 1, 3, 2)) * self.inv_sqrt_c_per_head, dim=-1)
        out = attn @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class _EffMLP(nn.Module):
    """models/common/mlp.py ``MLPBlock(dim, mlp_dim, dim, 1, ReLU)``: keys layers.0.0 and fc."""

    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU())])
        self.fc = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)


class _EffBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_dim, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = _EffAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = _EffAttention(dim, num_heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _EffMLP(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = _EffAttention(dim, num_heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if not self.skip_first_layer_pe:
            queries = queries + query_pe
        queries = self.norm1(queries + self.self_attn(q=queries, k=queries, v=queries))
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class MedSATwoWayTransformer(nn.Module):
    """Med-SA's (EfficientSAM-derived) TwoWayTransformer, same call signature as SAM's."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(_EffBlock(dim, num_heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = _EffAttention(dim, num_heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        return queries, keys


@functools.cache
def _medsa_decoder_class() -> type:
    """segment-anything's MaskDecoder with Med-SA's output slice (built on first use, so importing
    samedge does not import segment-anything)."""
    from segment_anything.modeling import MaskDecoder

    class MedSAMaskDecoder(MaskDecoder):
        """``num_mask_tokens = max(4, n)``; returns tokens ``0:n`` for either multimask flag; the
        image embeddings are repeated per prompt only when the batches differ (one prompt per
        image in Med-SA's training and validation loops)."""

        def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                          dense_prompt_embeddings):
            output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
            output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
            tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
            if image_embeddings.shape[0] != tokens.shape[0]:
                src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
            else:
                src = image_embeddings
            src = src + dense_prompt_embeddings
            pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
            b, c, h, w = src.shape
            hs, src = self.transformer(src, pos_src, tokens)
            iou_token_out = hs[:, 0, :]
            mask_tokens_out = hs[:, 1: (1 + self.num_mask_tokens), :]
            upscaled = self.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
            hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                                    for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
            return masks, self.iou_prediction_head(iou_token_out)

        def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                    dense_prompt_embeddings, multimask_output):
            masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                            dense_prompt_embeddings)
            return masks[:, : self.num_multimask_outputs], iou[:, : self.num_multimask_outputs]

    return MedSAMaskDecoder


def medsa_mask_decoder(shape: DecoderShape, outputs: int) -> nn.Module:
    """Med-SA's mask decoder: ``max(4, n)`` tokens, its transformer style, output ``0:n``."""
    from segment_anything.modeling import TwoWayTransformer

    if shape.transformer_style == "medsa":
        transformer = MedSATwoWayTransformer(shape.transformer_depth, shape.prompt_dim,
                                             DECODER_HEADS, shape.mlp_dim)
    else:
        transformer = TwoWayTransformer(depth=shape.transformer_depth, embedding_dim=shape.prompt_dim,
                                        mlp_dim=shape.mlp_dim, num_heads=DECODER_HEADS)
    decoder = _medsa_decoder_class()(
        num_multimask_outputs=max(4, outputs) - 1, transformer=transformer,
        transformer_dim=shape.prompt_dim, iou_head_depth=shape.iou_depth,
        iou_head_hidden_dim=shape.iou_hidden,
    )
    decoder.num_multimask_outputs = outputs
    return decoder


# -- loading ------------------------------------------------------------------------------------
def read_medsa(path: str | Path, base: str | Path | None = None) -> tuple[dict, str]:
    """The Med-SA state dict (unwrapped from its training checkpoint) and its encoder mode."""
    state = load_state_dict(path, "Med-SA checkpoint")
    if any(".Space_Adapter." in k for k in state):
        mode = "adapter"
    elif any(k.endswith("attn.qkv.lora_A") for k in state):
        mode = "lora"
    else:
        raise FamilyMismatchError(
            f"{path} is not a Med-SA checkpoint (no Space_Adapter or qkv lora_A keys); it looks "
            f"like {looks_like(state)}",
            hint="use the family that matches the file (samed, masam, sam ...)",
        )
    if base is not None:
        # Upstream loads SAM first (by name and shape) and then this dict over it; only the frozen
        # encoder and prompt-encoder tensors share SAM's names (rel-pos and the decoder do not).
        from samedge.models.samed import read_sam_base

        for k, v in read_sam_base(base).items():
            if k not in state and k.startswith(("image_encoder.", "prompt_encoder.")) and "rel_pos" not in k:
                state[k] = v
    return state, mode


def _rel_layout(state: dict, config: SamConfig, mode: str, path) -> tuple[str | None, dict]:
    """The rel-pos era's parameter name and per-block lengths, checked against the model size."""
    names = {m.group(1) for k in state if (m := re.search(r"\.attn\.(rel_pos|rel)_h$", k))}
    if len(names) > 1:
        raise KeyMismatchError(f"{path} mixes rel-pos names {sorted(names)}")
    name = next(iter(names), None)
    lengths: dict[int, tuple[int, int]] = {}
    if name is None:
        return None, lengths
    global_grid = LORA_GLOBAL_GRID if mode == "lora" else config.grid
    for i in range(config.depth):
        h, w = (state[f"image_encoder.blocks.{i}.attn.{name}_{a}"] for a in "hw")
        lengths[i] = (int(h.shape[0]), int(w.shape[0]))
        grid = global_grid if i in config.global_attn_indexes else config.window_size
        if lengths[i] != (2 * grid - 1, 2 * grid - 1):
            raise KeyMismatchError(
                f"{path}: image_encoder.blocks.{i}.attn.{name}_h is {tuple(h.shape)}, but a "
                f"{'global' if i in config.global_attn_indexes else 'windowed'} block of a Med-SA "
                f"{mode} model at image size {config.image_size} has {2 * grid - 1} positions",
                hint="pass the image_size the checkpoint was trained with (or leave it unset)",
            )
    return name, lengths


def medsa_reference(state: dict, mode: str, config: SamConfig, decoder_shape: DecoderShape,
                    outputs: int, depth: int, rel_layout: tuple[str | None, dict], path) -> SamParts:
    """Med-SA's Sam for this checkpoint: module tree and key names as upstream."""
    rel_name, lengths = rel_layout
    blocks = []
    for i in range(config.depth):
        window = 0 if i in config.global_attn_indexes else config.window_size
        args = (config.embed_dim, config.num_heads, window, rel_name, lengths.get(i))
        if mode == "adapter":
            fc1 = state[f"image_encoder.blocks.{i}.Space_Adapter.D_fc1.weight"]
            if fc1.shape[1] != config.embed_dim:
                raise KeyMismatchError(
                    f"{path}: Space_Adapter.D_fc1.weight {tuple(fc1.shape)} takes {fc1.shape[1]} "
                    f"features but the encoder width is {config.embed_dim} (-mid_dim != C)")
            blocks.append(MedSAAdapterBlock(*args, hidden=int(fc1.shape[0]), chunk=depth if depth > 1 else None))
        else:
            rank = int(state[f"image_encoder.blocks.{i}.attn.qkv.lora_A"].shape[0]) // 2
            blocks.append(MedSALoraBlock(*args, lora_rank=rank))
    pos_grid = int(state["image_encoder.pos_embed"].shape[1])
    encoder = MedSAImageEncoder(config, blocks, pos_grid, decoder_shape.prompt_dim)
    encoder.depth = depth
    return SamParts(encoder, prompt_encoder_for(config, decoder_shape.prompt_dim),
                    medsa_mask_decoder(decoder_shape, outputs))


def _outputs(shape: DecoderShape, multimask_output: int | None, path) -> int:
    tokens = shape.num_mask_tokens
    outputs = multimask_output if multimask_output is not None else (tokens if tokens > 4 else 1)
    if max(4, outputs) != tokens:
        raise KeyMismatchError(
            f"{path} has {tokens} mask tokens (mask_decoder.mask_tokens.weight) but "
            f"-multimask_output {outputs} builds max(4, {outputs}) = {max(4, outputs)}",
            hint="leave multimask_output unset to take it from the checkpoint",
        )
    return outputs


def medsa_preprocessing(config: SamConfig, era: Era, depth: int) -> Preprocessing:
    """2-D: Pillow bilinear stretch to S on the uint8 RGB image (torchvision's Resize before
    ToTensor), then legacy: [0, 1] straight into the encoder, (y, x) clicks; 2025: ×255 and SAM
    mean/std. 3-D (function.py's ``thd`` branch): the MONAI [0, 1] float volume (CT window
    [-175, 250]) resized as a tensor (bilinear; torchvision 0.13 in both eras' environments, no
    antialiasing), legacy straight in, 2025 through mean/std on the [0, 1] data (= mean/std ×255
    in the 0–255 scale); clicks stay (row, col). Masks: validation_sam resizes the low-res logits
    straight to the output size — legacy nearest, thresholded at 0.5 on logits (the centre of
    eval_seg's thresholds, applied to logits before 2025); 2025 bilinear, sigmoid > 0.5 (logits > 0)."""
    three_d = depth > 1
    if era == "legacy":
        norm = dict(normalize="unit")
        masks = dict(mask_interpolation="nearest", mask_threshold=0.5)
    else:
        scale = 255.0 if three_d else 1.0
        norm = dict(normalize="mean_std", pixel_mean=tuple(m * scale for m in SAM_PIXEL_MEAN),
                    pixel_std=tuple(s * scale for s in SAM_PIXEL_STD))
        masks = dict(mask_interpolation="bilinear", mask_threshold=0.0)
    resample = (dict(interpolation="bilinear", round_resized=False, source="float") if three_d
                else dict(interpolation="pil_bilinear"))
    return Preprocessing(
        image_size=config.image_size, resize="stretch",
        point_order="yx" if era == "legacy" or three_d else "xy", mask_size=4 * config.grid,
        ct_window=MEDSA_3D_CT_WINDOW if three_d else None, mask_path="direct", **resample,
        **norm, **masks,
    )


def build_medsa(
    checkpoint: str | Path,
    base: str | Path | None = None,
    depth: int = 1,
    era: Era = "legacy",
    image_size: int | None = None,
    num_heads: int | None = None,
    global_attn_indexes: tuple[int, ...] | None = None,
    multimask_output: int | None = None,
    merged: bool = True,
) -> ModelCard:
    """Med-SA from its training checkpoint (sam_adpt or sam_lora, any rel-pos era).

    ``depth`` > 1 builds the 3D model (``-thd True -chunk depth``): the encoder takes exactly
    ``depth`` adjacent slices as its batch. ``era`` picks the preprocessing of the code the model
    was trained with (the weights do not tell). ``image_size`` is read from the global rel-pos
    length where that follows it (sam_adpt with rel-pos); otherwise pass it. ``base`` (optional)
    fills frozen SAM tensors a file lacks, with Med-SA's name-and-shape rule.
    """
    if era not in ("legacy", "2025"):
        raise ValueError(f"era must be 'legacy' or '2025', not {era!r}")
    state, mode = read_medsa(checkpoint, base)
    if mode == "lora" and depth > 1:
        raise FamilyMismatchError(f"{checkpoint} is a sam_lora model; Med-SA's 3D branch exists only in sam_adpt")
    if depth > 1:
        closest_numbers(depth)
    what = f"Med-SA checkpoint {checkpoint}"
    config = infer_encoder(state, what=what, image_size=image_size, num_heads=num_heads,
                           global_attn_indexes=global_attn_indexes,
                           size_from_rel_pos=mode == "adapter", size_from_pos_embed=False)
    shape = infer_decoder(state, what)
    outputs = _outputs(shape, multimask_output, checkpoint)
    config = replace(config, prompt_dim=shape.prompt_dim, num_multimask_outputs=outputs)
    rel_layout = _rel_layout(state, config, mode, checkpoint)
    reference = medsa_reference(state, mode, config, shape, outputs, depth, rel_layout, checkpoint)
    load_into(reference, state, f"Med-SA {mode} ({variant_name(config)}, image {config.image_size})")
    reference.eval()

    from samedge.export.merge import merge_medsa

    model = merge_medsa(reference) if merged else reference
    rel = rel_layout[0]
    zero = rel is not None and not any(bool(v.abs().max() > 0) for k, v in state.items()
                                       if re.search(rf"\.attn\.{rel}_[hw]$", k))
    notes = [
        f"decoder returns mask tokens 0:{outputs} for either multimask flag "
        f"({shape.num_mask_tokens} tokens; {shape.transformer_style} two-way transformer)",
        f"encoder: {mode}, rel-pos parameters {rel or 'absent'}"
        + (" (all zero: dropped from the merged graph)" if zero else ""),
        "pos_embed (1, 64, 64, C) bicubic-resized to the token grid once, as a constant",
        "images are stretched to the square input (torchvision Resize: Pillow in 2-D, tensor "
        "bilinear in 3-D)",
        "low-res logits resized straight to the image, "
        + ("nearest, > 0.5 (legacy)" if era == "legacy" else "bilinear, > 0 (2025)"),
    ]
    if depth > 1:
        dh, dw = closest_numbers(depth)
        notes += [f"3D: the batch is {depth} adjacent slices, depth attention on a {dh}x{dw} grid; "
                  "in windowed blocks slices and windows mix as upstream does",
                  "3D clicks are (row, col) in the ROI frame before the resize to the input size"]
    return ModelCard(
        "medsa", variant_name(config), model, medsa_preprocessing(config, era, depth),
        prompt="points", multimask_default=False, decoder="prompt", depth=depth,
        reference=reference, notes=notes,
        checkpoint={"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint),
                    "mode": mode, "era": era, "rel_pos": rel,
                    **({"base": str(Path(base).resolve())} if base else {})},
    )


@torch.no_grad()
def reference_forward(card_or_model: ModelCard | nn.Module, images: torch.Tensor,
                      point_coords: torch.Tensor, point_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Med-SA's validation step on encoder-ready images (N, 3, S, S) and one prompt per image:
    points (N, P, 2) as passed to the prompt encoder (x, y in the S frame) with labels (N, P);
    boxes and masks are None, so a padding point is appended."""
    model = card_or_model.reference if isinstance(card_or_model, ModelCard) else card_or_model
    if model is None:
        raise CheckpointError("this card has no reference model")
    embeddings = model.image_encoder(images)
    sparse, dense = model.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
    decoder = model.mask_decoder
    low_res, iou = decoder(image_embeddings=embeddings, image_pe=model.prompt_encoder.get_dense_pe(),
                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                           multimask_output=decoder.num_multimask_outputs > 1)
    return {"embeddings": embeddings, "low_res_logits": low_res, "iou_predictions": iou}
