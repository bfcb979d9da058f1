"""Fold every linear adaptation into the frozen weights and rebuild the encoder exportably.

Linear updates become part of the weight they add to (rows of ``qkv.weight`` are [q; k; v]; biases
never change):
- SAMed LoRA, block i:        W[0:C] += w_b_{2i} @ w_a_{2i};   W[2C:3C] += w_b_{2i+1} @ w_a_{2i+1}
- SAMed_s decoder LoRA:       proj.weight += w_b @ w_a (q_proj and v_proj of each attention)
- MA-SAM FacT-TT, block i:    W[0:C] += s·FacTv @ q_FacTs_i @ FacTu;  W[2C:3C] likewise with v
- Med-SA sam_lora (loralib):  W[0:C] += (1/r)·B[0:C] @ A[0:r];  W[2C:3C] += (1/r)·B[C:2C] @ A[r:2r];
                              mlp.linX.weight += (1/r)·B @ A
Products are formed in float64 and rounded once. What cannot be folded stays as ordinary modules
(Med-SA's GELU adapters and 3D depth branch, MA-SAM's slice convolutions), and per-call
computations become constants (pos_embed resizes, rel-pos tables) — see ``models/vit_blocks.py``.

The merged model shares every unchanged submodule with its reference (the reference stays the
ground truth; merging never modifies it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from samedge.models.medsa import LoRALinear, LoRAMergedLinear, MedSAAdapterBlock, closest_numbers
from samedge.models.samed import LoRAProj
from samedge.models.vit_blocks import (
    AdapterBlock,
    Attention,
    Block,
    DepthRegroup,
    Encoder,
    SamParts,
    SliceAdapter,
    SliceAdapterBlock,
)


def low_rank(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · B @ A`` in float64."""
    return scale * (b.detach().double() @ a.detach().double())


def fold_linear(linear: nn.Linear, delta: torch.Tensor) -> nn.Linear:
    """A new Linear with ``weight + delta`` (rounded once to the weight's dtype), same bias."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_((linear.weight.detach().double() + delta).to(linear.weight.dtype))
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
    return out


def fold_qv(qkv: nn.Linear, delta_q: torch.Tensor, delta_v: torch.Tensor) -> nn.Linear:
    """Add the q and v updates to rows [0:C] and [2C:3C] of a fused qkv projection."""
    zero_k = delta_q.new_zeros(delta_q.shape)
    return fold_linear(qkv, torch.cat([delta_q, zero_k, delta_v], dim=0))


def _grid(encoder: nn.Module) -> int:
    return encoder.img_size // encoder.patch_embed.proj.kernel_size[0]


def _attention(qkv: nn.Linear, proj: nn.Linear, num_heads: int, rel_pos, window: int, grid: int,
               extra_grids=()) -> Attention:
    tokens = (window, window) if window else (grid, grid)
    return Attention(qkv, proj, num_heads, rel_pos, [tokens, *extra_grids])


def merge_samed(reference: SamParts) -> SamParts:
    """SAMed/SAMed_h/SAMed_s: plain SAM blocks with LoRA folded into qkv (and decoder q/v)."""
    enc = reference.image_encoder
    grid = _grid(enc)
    blocks = []
    for blk in enc.blocks:
        lora = blk.attn.qkv
        qkv = fold_qv(lora.qkv, low_rank(lora.linear_b_q.weight, lora.linear_a_q.weight),
                      low_rank(lora.linear_b_v.weight, lora.linear_a_v.weight))
        attn = _attention(qkv, blk.attn.proj, blk.attn.num_heads,
                          (blk.attn.rel_pos_h, blk.attn.rel_pos_w), blk.window_size, grid)
        blocks.append(Block(blk.norm1, attn, blk.norm2, blk.mlp, blk.window_size, grid))
    encoder = Encoder(enc.patch_embed, enc.pos_embed, blocks, enc.neck, enc.img_size)
    return SamParts(encoder, reference.prompt_encoder, _fold_decoder_lora(reference.mask_decoder))


def _fold_decoder_lora(decoder: nn.Module) -> nn.Module:
    """Replace SAMed_s ``LoRAProj`` wrappers by plain folded Linears (in a copy of the decoder)."""
    if not any(isinstance(m, LoRAProj) for m in decoder.modules()):
        return decoder
    decoder = copy.deepcopy(decoder)
    for module in list(decoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRAProj):
                setattr(module, name, fold_linear(child.proj, low_rank(child.w_b.weight, child.w_a.weight)))
    return decoder


def merge_masam(reference: SamParts) -> SamParts:
    """MA-SAM: FacT folded into qkv; the two slice adapters per block kept (Conv3d over D)."""
    fact = reference.image_encoder
    vit, depth = fact.ImageEncoderViT, fact.depth
    u, v = fact.FacTu.weight, fact.FacTv.weight.detach().double()
    grid = _grid(vit)
    blocks = []
    for wrapped in vit.blocks:
        blk = wrapped.Block
        a = blk.attn.Attention
        fq = a.qkv
        qkv = fold_qv(fq.qkv, fq.s * (v @ low_rank(fq.q_FacTs.weight, u)),
                      fq.s * (v @ low_rank(fq.v_FacTs.weight, u)))
        attn = _attention(qkv, a.proj, a.num_heads, (a.rel_pos_h, a.rel_pos_w), blk.window_size, grid)
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


def _fold_mlp(mlp: nn.Module) -> nn.Module:
    """SAM's MLPBlock (GELU) with loralib's update folded into lin1 and lin2."""
    from segment_anything.modeling.common import MLPBlock

    folded = MLPBlock(mlp.lin1.in_features, mlp.lin1.out_features)
    for name in ("lin1", "lin2"):
        lin = getattr(mlp, name)
        setattr(folded, name, fold_linear(lin, low_rank(lin.lora_B, lin.lora_A, lin.scaling)))
    return folded


def merge_medsa(reference: SamParts) -> SamParts:
    """Med-SA: pos_embed resized once; sam_lora folded into qkv and the MLP linears; adapter
    blocks keep their adapters and (3D) the depth branch with baked regroup sizes."""
    enc = reference.image_encoder
    grid, depth = _grid(enc), enc.depth
    blocks = []
    for blk in enc.blocks:
        a, c = blk.attn, blk.attn.proj.in_features
        qkv = a.qkv
        if isinstance(qkv, LoRAMergedLinear):
            r, s = qkv.r, qkv.scaling
            qkv = fold_qv(qkv, low_rank(qkv.lora_B[:c], qkv.lora_A[:r], s),
                          low_rank(qkv.lora_B[c:], qkv.lora_A[r:], s))
        mlp = _fold_mlp(blk.mlp) if isinstance(blk.mlp.lin1, LoRALinear) else blk.mlp
        window = blk.window_size
        if isinstance(blk, MedSAAdapterBlock):
            tokens = (window, window) if window else (grid, grid)
            regroup = None
            if blk.chunk:
                regroup = DepthRegroup(blk.chunk, closest_numbers(blk.chunk), tokens, c)
            attn = _attention(qkv, a.proj, a.num_heads, a.rel_pos, window, grid,
                              [regroup.grid] if regroup else [])
            blocks.append(AdapterBlock(blk.norm1, attn, blk.norm2, mlp, window, grid, blk.Space_Adapter,
                                       blk.MLP_Adapter, blk.scale,
                                       blk.Depth_Adapter if regroup else None, regroup))
        else:
            attn = _attention(qkv, a.proj, a.num_heads, a.rel_pos, window, grid)
            blocks.append(Block(blk.norm1, attn, blk.norm2, mlp, window, grid))
    with torch.no_grad():
        pos_embed = enc.resized_pos_embed((grid, grid))
    encoder = Encoder(enc.patch_embed, pos_embed, blocks, enc.neck, enc.img_size, depth)
    return SamParts(encoder, reference.prompt_encoder, reference.mask_decoder)
