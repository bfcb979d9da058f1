"""Exportable ViT pieces that the merged (deployable) models are assembled from.

The upstream encoders compute things an engine should not: rel-pos tables gathered (and
interpolated) every call, ``einsum`` (TensorRT takes only some equations), pos-embed resizes, the
LoRA/FacT in-place slice-adds (ScatterND). These modules hold every such quantity as a constant
computed once at build time, use matmul/permute only, and take their reshape sizes from build-time
integers, so a traced graph has static shapes and no data-dependent control flow.

Everything here is numerically the upstream computation; the adaptation-specific parts that cannot
be folded into weights (Med-SA bottleneck adapters and depth branch, MA-SAM slice convolutions) are
ordinary modules too, so the families' ``merge_*`` functions only rewire modules and folds weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """Med-SA's bottleneck adapter: ``D_fc2(GELU(D_fc1(x)))``, plus ``x`` when ``skip_connect``.

    Shared by the upstream-faithful reference and the merged model (it is already exportable).
    """

    def __init__(self, features: int, hidden: int, skip_connect: bool = True):
        super().__init__()
        self.skip_connect = skip_connect
        self.act = nn.GELU()
        self.D_fc1 = nn.Linear(features, hidden)
        self.D_fc2 = nn.Linear(hidden, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.D_fc2(self.act(self.D_fc1(x)))
        return x + xs if self.skip_connect else xs


def add_rel_pos(attn: torch.Tensor, q: torch.Tensor, rh_t: torch.Tensor, rw_t: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
    """SAM's ``add_decomposed_rel_pos`` for q_size == k_size, with batched matmuls instead of einsum.

    ``rh_t`` (h, hd, h) and ``rw_t`` (w, hd, w) are the gathered tables, transposed once at build.
    rel_h[b,y,x,k] = Σ_c q[b,y,x,c]·Rh[y,k,c] is a matmul batched over y; rel_w likewise over x.
    """
    h, w = size
    dim = rh_t.shape[1]
    r_q = q.reshape(-1, h, w, dim)
    rel_h = torch.matmul(r_q.permute(1, 0, 2, 3).reshape(h, -1, dim), rh_t)
    rel_h = rel_h.reshape(h, -1, w, h).permute(1, 0, 2, 3)
    rel_w = torch.matmul(r_q.permute(2, 0, 1, 3).reshape(w, -1, dim), rw_t)
    rel_w = rel_w.reshape(w, -1, h, w).permute(1, 2, 0, 3)
    attn = attn.reshape(-1, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.reshape(-1, h * w, h * w)


class Attention(nn.Module):
    """SAM attention over (B, h, w, C) tokens with rel-pos tables baked per token grid.

    ``rel_pos`` maps each grid the attention is called on (the window, the global grid, Med-SA's
    dh×dw depth grid) to the upstream ``(rel_pos_h, rel_pos_w)`` parameters; the gathered tables
    are computed with segment-anything's own ``get_rel_pos`` (including its linear resize) and
    stored as constants. All-zero parameters (Med-SA's frozen ``rel_h``) add nothing and are dropped.
    The caller names the grid, so every reshape uses build-time integers.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int,
                 rel_pos: tuple[torch.Tensor, torch.Tensor] | None, grids: list[tuple[int, int]]):
        super().__init__()
        from segment_anything.modeling.image_encoder import get_rel_pos

        self.qkv, self.proj, self.num_heads = qkv, proj, num_heads
        self.head_dim = qkv.in_features // num_heads
        self.scale = self.head_dim ** -0.5
        self.grids: list[tuple[int, int]] = []
        if rel_pos is not None and any(bool(t.detach().abs().max() > 0) for t in rel_pos):
            with torch.no_grad():
                for h, w in dict.fromkeys(grids):
                    rh = get_rel_pos(h, h, rel_pos[0].detach().float())
                    rw = get_rel_pos(w, w, rel_pos[1].detach().float())
                    self.register_buffer(f"rel_h_{h}x{w}", rh.transpose(1, 2).contiguous())
                    self.register_buffer(f"rel_w_{h}x{w}", rw.transpose(1, 2).contiguous())
                    self.grids.append((h, w))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        heads, dim = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(-1, h * w, 3, heads, dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, -1, h * w, dim).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.grids:
            rh_t, rw_t = getattr(self, f"rel_h_{h}x{w}"), getattr(self, f"rel_w_{h}x{w}")
            attn = add_rel_pos(attn, q, rh_t, rw_t, grid)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).reshape(-1, heads, h, w, dim).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(-1, h, w, heads * dim))


class Block(nn.Module):
    """SAM's block: ``x += Attn(LN1 x)`` (windowed unless global), ``x += MLP(LN2 x)``.

    ``grid`` is the token grid side; windows are cut with a static pad and 6-D reshape/permute
    (SAM's ``window_partition`` computes the padding from traced shapes and branches on it).
    """

    def __init__(self, norm1: nn.Module, attn: Attention, norm2: nn.Module, mlp: nn.Module,
                 window_size: int, grid: int):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.window_size, self.grid = window_size, grid
        self.dim = attn.qkv.in_features
        self.padded = -(-grid // window_size) * window_size if window_size else grid
        self.tokens = (window_size, window_size) if window_size else (grid, grid)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        if not self.window_size:
            return x
        pad, ws, n = self.padded - self.grid, self.window_size, self.padded // self.window_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        x = x.reshape(-1, n, ws, n, ws, self.dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, ws, ws, self.dim)

    def unpartition(self, x: torch.Tensor) -> torch.Tensor:
        if not self.window_size:
            return x
        ws, n = self.window_size, self.padded // self.window_size
        x = x.reshape(-1, n, n, ws, ws, self.dim).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, self.padded, self.padded, self.dim)
        return x[:, : self.grid, : self.grid, :] if self.padded > self.grid else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.unpartition(self.attn(self.partition(self.norm1(x)), self.tokens))
        return x + self.mlp(self.norm2(x))


class DepthRegroup(nn.Module):
    """Med-SA's 3D regroup, with every size fixed at build time.

    ``(b d) h w c -> (b h w) d c`` over the *leading* dim of the (possibly windowed) tokens, a view
    of the d axis as a (dh, dw) grid, attention there, then back. In windowed blocks the leading
    dim is ordered (slice, window), so groups of ``depth`` consecutive entries mix windows and
    slices; this reproduces upstream exactly, because it is the same reshape of the same tensor.
    """

    def __init__(self, depth: int, grid: tuple[int, int], tokens_hw: tuple[int, int], dim: int):
        super().__init__()
        self.depth, self.grid, self.tokens_hw, self.dim = depth, grid, tokens_hw, dim

    def to_depth(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.tokens_hw
        x = x.reshape(-1, self.depth, h, w, self.dim).permute(0, 2, 3, 1, 4)
        return x.reshape(-1, self.grid[0], self.grid[1], self.dim)

    def from_depth(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.tokens_hw
        x = x.reshape(-1, h, w, self.depth, self.dim).permute(0, 3, 1, 2, 4)
        return x.reshape(-1, h, w, self.dim)


class AdapterBlock(Block):
    """Med-SA's AdapterBlock: ``x += Space_Adapter(Attn(LN1 x)) [+ depth branch]``, then
    ``x += MLP(LN2 x) + scale·MLP_Adapter(LN2 x)``.

    The 3D branch (``regroup`` set) runs the same frozen attention over the slices of each token
    and adds ``Depth_Adapter`` of it, all inside the window layout as upstream does.
    """

    def __init__(self, norm1, attn, norm2, mlp, window_size: int, grid: int,
                 space_adapter: Adapter, mlp_adapter: Adapter, scale: float,
                 depth_adapter: Adapter | None = None, regroup: DepthRegroup | None = None):
        super().__init__(norm1, attn, norm2, mlp, window_size, grid)
        self.Space_Adapter, self.MLP_Adapter, self.scale = space_adapter, mlp_adapter, scale
        self.Depth_Adapter, self.regroup = depth_adapter, regroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = self.partition(x)
        a = self.Space_Adapter(self.attn(self.norm1(windows), self.tokens))
        if self.regroup is not None:
            xd = self.attn(self.norm1(self.regroup.to_depth(windows)), self.regroup.grid)
            a = a + self.regroup.from_depth(self.Depth_Adapter(xd))
        x = x + self.unpartition(a)
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.scale * self.MLP_Adapter(xn)


class SliceAdapter(nn.Module):
    """MA-SAM's 3D adapter: LN → Linear down → Conv3d(3,1,1) across the D slices → GELU → up.

    The batch is (volumes · depth) slices; the reshape to (volumes, depth, H', W', ch) uses the
    build-time depth and grid, so the graph holds no shape arithmetic.
    """

    def __init__(self, norm: nn.Module, down: nn.Linear, conv: nn.Conv3d, up: nn.Linear,
                 depth: int, grid: int):
        super().__init__()
        self.norm, self.down, self.up = norm, down, up
        self.conv = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size,
                              padding=tuple(k // 2 for k in conv.kernel_size))  # = 'same'
        self.conv.weight, self.conv.bias = conv.weight, conv.bias
        self.act = nn.GELU()
        self.depth, self.grid, self.channels = depth, grid, down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, ch = self.grid, self.channels
        y = self.down(self.norm(x)).reshape(-1, self.depth, g, g, ch).permute(0, 4, 1, 2, 3)
        y = self.conv(y).permute(0, 2, 3, 4, 1).reshape(-1, g, g, ch)
        return self.up(self.act(y))


class SliceAdapterBlock(Block):
    """MA-SAM's block: ``x += A1(x)``; ``x += Attn(LN1 x)``; ``x += A2(x)``; ``x += MLP(LN2 x)``."""

    def __init__(self, norm1, attn, norm2, mlp, window_size: int, grid: int,
                 adapter1: SliceAdapter, adapter2: SliceAdapter):
        super().__init__(norm1, attn, norm2, mlp, window_size, grid)
        self.adapter1, self.adapter2 = adapter1, adapter2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.adapter1(x)
        x = x + self.unpartition(self.attn(self.partition(self.norm1(x)), self.tokens))
        x = x + self.adapter2(x)
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Patch embedding + constant (already resized) pos_embed + blocks + neck.

    Input (N, 3, S, S) → (N, 256, S/16, S/16). Depth models take the D adjacent slices as N.
    """

    def __init__(self, patch_embed: nn.Module, pos_embed: torch.Tensor, blocks: list[nn.Module],
                 neck: nn.Module, img_size: int, depth: int = 1):
        super().__init__()
        self.patch_embed, self.neck = patch_embed, neck
        self.register_buffer("pos_embed", pos_embed.detach().clone())
        self.blocks = nn.ModuleList(blocks)
        self.img_size, self.depth = img_size, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class SamParts(nn.Module):
    """The three SAM parts under their upstream attribute names (state-dict keys match SAM's)."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
