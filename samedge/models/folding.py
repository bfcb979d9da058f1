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

Each family module applies these in its own ``merge_*``. The merged model shares every unchanged submodule with its reference (the reference stays the
ground truth; merging never modifies it).
"""

from __future__ import annotations

import torch
from torch import nn

from samedge.models.vit_blocks import Attention


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


def token_grid(encoder: nn.Module) -> int:
    return encoder.img_size // encoder.patch_embed.proj.kernel_size[0]


def folded_attention(qkv: nn.Linear, proj: nn.Linear, num_heads: int, rel_pos, window: int, grid: int,
               extra_grids=()) -> Attention:
    tokens = (window, window) if window else (grid, grid)
    return Attention(qkv, proj, num_heads, rel_pos, [tokens, *extra_grids])
