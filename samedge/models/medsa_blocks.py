"""Med-SA's modules as upstream writes them: loralib LoRA, adapter and LoRA blocks, its decoder.

Upstream-faithful on purpose: these are the reference the merged, exportable model is checked
against (``models/ImageEncoder/vit/{adapter,lora}_block.py``, ``models/common/loralib``, the
EfficientSAM-style TwoWayTransformer of its mask decoder).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from samedge.models.infer import (
    DECODER_HEADS,
    DecoderShape,
)
from samedge.models.sam import SamConfig
from samedge.models.vit_blocks import Adapter

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
        from segment_anything.modeling.image_encoder import (
            window_partition,
            window_unpartition,
        )

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
        from segment_anything.modeling.image_encoder import (
            window_partition,
            window_unpartition,
        )

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
