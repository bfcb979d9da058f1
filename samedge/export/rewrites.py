"""Export-time rewrites: modules that compute what the original computes, shaped for the engines.

Draft under measurement.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

OPTIONS = {"variant": "A", "bias_after_pad": True, "conv_layout": True}


def _fold_conv_bn(conv_bn: nn.Module) -> nn.Conv2d:
    c, bn = conv_bn.c, conv_bn.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                      c.dilation, c.groups, bias=True)
    with torch.no_grad():
        fused.weight.copy_(c.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
    return fused


class WindowBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        attn = block.attn
        self.height, self.width = block.input_resolution
        self.window = block.window_size
        self.heads, self.key_dim, self.head_dim = attn.num_heads, attn.key_dim, attn.d
        assert self.key_dim == self.head_dim
        dim = block.dim
        self.dim = dim
        gamma, beta = attn.norm.weight.detach(), attn.norm.bias.detach()
        self.eps = attn.norm.eps
        weight = attn.qkv.weight.detach() * gamma[None, :]
        bias = attn.qkv.bias.detach() + attn.qkv.weight.detach() @ beta
        # rows are (heads, 3, d); scale q rows
        w = weight.reshape(self.heads, 3, self.head_dim, dim).clone()
        b = bias.reshape(self.heads, 3, self.head_dim).clone()
        w[:, 0] *= attn.scale
        b[:, 0] *= attn.scale
        variant = OPTIONS["variant"]
        self.variant = variant
        if variant == "A":
            self.qkv_weight = nn.Parameter(w.reshape(-1, dim), requires_grad=False)
            self.qkv_bias = nn.Parameter(b.reshape(-1), requires_grad=False)
        else:  # B: separate q, k, v
            self.q_weight = nn.Parameter(w[:, 0].reshape(-1, dim).contiguous(), requires_grad=False)
            self.k_weight = nn.Parameter(w[:, 1].reshape(-1, dim).contiguous(), requires_grad=False)
            self.v_weight = nn.Parameter(w[:, 2].reshape(-1, dim).contiguous(), requires_grad=False)
            self.q_bias = nn.Parameter(b[:, 0].reshape(-1).contiguous(), requires_grad=False)
            self.k_bias = nn.Parameter(b[:, 1].reshape(-1).contiguous(), requires_grad=False)
            self.v_bias = nn.Parameter(b[:, 2].reshape(-1).contiguous(), requires_grad=False)
        self.register_buffer("attn_bias", attn.attention_biases[:, attn.attention_bias_idxs]
                             .detach().clone())
        self.proj = attn.proj
        self.local_conv = _fold_conv_bn(block.local_conv)
        self.mlp = block.mlp

    def _pad(self, t, pad_b, pad_r, bias):
        if OPTIONS["bias_after_pad"]:
            t = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
            return t + bias
        t = t + bias
        t = F.pad(t - bias, (0, 0, 0, pad_r, 0, pad_b)) + bias
        return t

    def forward(self, x):
        H, W, ws = self.height, self.width, self.window
        B, L, C = x.shape
        heads, d = self.heads, self.head_dim
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // ws, pW // ws
        n = F.layer_norm(x, (C,), eps=self.eps)
        if self.variant == "A":
            t = F.linear(n, self.qkv_weight).view(B, H, W, -1)
            t = self._pad(t, pad_b, pad_r, self.qkv_bias)
            t = t.view(B * nH, ws, nW, ws, heads, 3, d).permute(5, 0, 2, 4, 1, 3, 6)
            t = t.reshape(3, B * nH * nW, heads, ws * ws, d)
            q, k, v = t[0], t[1], t[2]
        else:
            parts = []
            for w_, b_ in ((self.q_weight, self.q_bias), (self.k_weight, self.k_bias),
                           (self.v_weight, self.v_bias)):
                t = F.linear(n, w_).view(B, H, W, -1)
                t = self._pad(t, pad_b, pad_r, b_)
                t = t.view(B * nH, ws, nW, ws, heads, d).permute(0, 2, 4, 1, 3, 5)
                parts.append(t.reshape(B * nH * nW, heads, ws * ws, d))
            q, k, v = parts
        attn = torch.matmul(q, k.transpose(-2, -1)) + self.attn_bias
        attn = attn.softmax(dim=-1)
        o = torch.matmul(attn, v)  # (nWin, heads, ws*ws, d)
        o = o.view(B * nH, nW, heads, ws, ws, d).permute(0, 3, 1, 4, 2, 5)
        o = o.reshape(B, pH, pW, heads * d)
        if pad_b or pad_r:
            o = o[:, :H, :W]
        o = self.proj(o.reshape(B, L, heads * d))
        x = x + o
        if OPTIONS["conv_layout"]:
            y = self.local_conv(x.view(B, H, W, C).permute(0, 3, 1, 2))
            x = y.permute(0, 2, 3, 1).reshape(B, L, C)
        else:
            y = self.local_conv(x.transpose(1, 2).reshape(B, C, H, W))
            x = y.view(B, C, L).transpose(1, 2)
        return x + self.mlp(x)


class MergeBlock(nn.Module):
    def __init__(self, merging):
        super().__init__()
        self.height, self.width = merging.input_resolution
        self.conv1 = _fold_conv_bn(merging.conv1)
        self.conv2 = _fold_conv_bn(merging.conv2)
        self.conv3 = _fold_conv_bn(merging.conv3)
        self.act = merging.act

    def forward(self, x):
        if x.ndim == 3:
            B = x.shape[0]
            x = x.view(B, self.height, self.width, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        B, C = x.shape[:2]
        if OPTIONS["conv_layout"]:
            return x.permute(0, 2, 3, 1).reshape(B, -1, C)
        return x.flatten(2).transpose(1, 2)


class MBConvBlock(nn.Module):
    def __init__(self, mb):
        super().__init__()
        self.conv1 = _fold_conv_bn(mb.conv1)
        self.conv2 = _fold_conv_bn(mb.conv2)
        self.conv3 = _fold_conv_bn(mb.conv3)
        self.act1, self.act2, self.act3 = mb.act1, mb.act2, mb.act3

    def forward(self, x):
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


def rewrite_encoder(encoder: nn.Module) -> nn.Module:
    enc = copy.deepcopy(encoder).eval()
    pe = enc.patch_embed.seq
    for i in (0, 2):
        pe[i] = _fold_conv_bn(pe[i])
    for layer in enc.layers:
        if hasattr(layer.blocks[0], "attn"):
            layer.blocks = nn.ModuleList(WindowBlock(b) for b in layer.blocks)
        else:
            layer.blocks = nn.ModuleList(MBConvBlock(b) for b in layer.blocks)
        if layer.downsample is not None:
            layer.downsample = MergeBlock(layer.downsample)
    return enc


# -- decoder ------------------------------------------------------------------------------------
DEC_OPTIONS = {"hoist": True, "lowrank": True, "ft": True, "t2i": "reassoc", "i2t": "reassoc"}


class FastPromptDecoder(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.inner = decoder
        md = decoder.mask_decoder
        tr = md.transformer
        pe_cf = decoder.dense_pe.flatten(2)  # (1, C, HW)
        self.register_buffer("pe_tokens", pe_cf.transpose(1, 2).clone())
        self.register_buffer("pe_cf", pe_cf.clone())
        # mask prompt: last 1x1 conv of mask_downscaling, kept apart (low rank: 16 → 256)
        down = decoder.prompt_encoder.mask_downscaling
        self.mask_features = down[:-1]
        last = down[-1]
        self.register_buffer("mask_w", last.weight.detach()[:, :, 0, 0].clone())  # (C, r)
        self.register_buffer("mask_b", last.bias.detach().clone())
        self.register_buffer("no_mask", decoder.prompt_encoder.no_mask_embed.weight.detach()[0].clone())
        # layer-0 token→image attention with image-only keys/values hoisted
        attn = tr.layers[0].cross_attn_token_to_image
        h = attn.num_heads
        d = attn.internal_dim // h
        wk = attn.k_proj.weight.detach().reshape(h, d, -1)  # (h, d, C)
        wv = attn.v_proj.weight.detach().reshape(h, d, -1)
        self.register_buffer("l0_wk", wk.clone())
        self.register_buffer("l0_wv", wv.clone())
        self.register_buffer("l0_mk", (wk @ self.mask_w).clone())  # (h, d, r)
        self.register_buffer("l0_mv", (wv @ self.mask_w).transpose(1, 2).clone())  # (h, r, d)
        self.register_buffer("l0_cv", (wv @ self.mask_b).clone())  # (h, d)
        self.register_buffer("l0_nv", (wv @ self.no_mask).clone())  # (h, d)
        self.register_buffer("l0_bv", attn.v_proj.bias.detach().reshape(h, d).clone())
        # upscaler as matmuls
        ct1, ln, _, ct2, _ = md.output_upscaling
        self.register_buffer("up1_w", ct1.weight.detach().permute(0, 2, 3, 1).reshape(
            ct1.in_channels, -1).clone())
        self.register_buffer("up1_b", ct1.bias.detach().repeat(4).clone())
        self.up1_out = ct1.out_channels
        self.register_buffer("ln_w", ln.weight.detach().clone())
        self.register_buffer("ln_b", ln.bias.detach().clone())
        self.ln_eps = ln.eps
        self.register_buffer("up2_w", ct2.weight.detach().permute(0, 2, 3, 1).reshape(
            ct2.in_channels, -1).clone())
        self.register_buffer("up2_b", ct2.bias.detach().repeat(4).clone())
        self.up2_out = ct2.out_channels

    # token → image: T queries attend to HW image keys; keys never projected
    def _token_to_image(self, attn, q_tokens, k_image, v_image):
        if DEC_OPTIONS["t2i"] == "proj":
            return attn(q=q_tokens, k=k_image, v=v_image)
        B, T, _ = q_tokens.shape
        h = attn.num_heads
        q = attn.q_proj(q_tokens)  # (B, T, Ci)
        ci = q.shape[-1]
        d = ci // h
        q = q.reshape(B, T, h, d).transpose(1, 2)  # (B, h, T, d)
        wk = attn.k_proj.weight.reshape(h, d, -1)  # (h, d, C)
        g = torch.matmul(q, wk) * (1.0 / math.sqrt(d))  # (B, h, T, C)
        g = g.reshape(B, h * T, -1)
        s = torch.matmul(g, k_image.transpose(1, 2))  # (B, hT, HW)
        a = s.softmax(dim=-1)
        r = torch.matmul(a, v_image).reshape(B, h, T, -1)  # (B, h, T, C)
        wv = attn.v_proj.weight.reshape(h, d, -1).transpose(1, 2)  # (h, C, d)
        o = torch.matmul(r, wv) + attn.v_proj.bias.reshape(h, 1, d)  # (B, h, T, d)
        o = o.transpose(1, 2).reshape(B, T, ci)
        return attn.out_proj(o)

    def _token_to_image_l0(self, attn, q_tokens, image_cf, feats_cf, feats_cl, has):
        """Layer 0: keys = image + pe + dense, values = image + dense, dense of rank r."""
        B, T, _ = q_tokens.shape
        h = attn.num_heads
        q = attn.q_proj(q_tokens)
        ci = q.shape[-1]
        d = ci // h
        q = q.reshape(B, T, h, d).permute(2, 0, 1, 3) * (1.0 / math.sqrt(d))  # (h, B, T, d)
        k_sh = torch.matmul(self.l0_wk, image_cf + self.pe_cf)  # (h, d, HW) once
        v_sh = torch.matmul(self.l0_wv, image_cf).transpose(1, 2)  # (h, HW, d) once
        hw = k_sh.shape[-1]
        s = torch.matmul(q.reshape(h, B * T, d), k_sh).reshape(h, B, T, hw)
        hasm = has.reshape(1, B, 1, 1)
        corr = torch.matmul(torch.matmul(q, self.l0_mk.unsqueeze(1)), feats_cf)  # (h,B,T,HW)
        a = (s + hasm * corr).softmax(dim=-1)
        r = torch.matmul(a.reshape(h, B * T, hw), v_sh).reshape(h, B, T, d)
        rf = torch.matmul(torch.matmul(a, feats_cl), self.l0_mv.unsqueeze(1))  # (h, B, T, d)
        const = hasm * self.l0_cv.reshape(h, 1, 1, d) + (1 - hasm) * self.l0_nv.reshape(h, 1, 1, d)
        o = r + hasm * rf + const + self.l0_bv.reshape(h, 1, 1, d)
        o = o.permute(1, 2, 0, 3).reshape(B, T, ci)
        return attn.out_proj(o)

    # image → token: HW image queries attend to T token keys
    def _image_to_token(self, attn, q_image, k_tokens, v_tokens):
        if DEC_OPTIONS["i2t"] == "proj":
            return attn(q=q_image, k=k_tokens, v=v_tokens)
        B, T, _ = k_tokens.shape
        h = attn.num_heads
        k = attn.k_proj(k_tokens)
        ci = k.shape[-1]
        d = ci // h
        k = k.reshape(B, T, h, d).transpose(1, 2)  # (B, h, T, d)
        scale = 1.0 / math.sqrt(d)
        wq = attn.q_proj.weight.reshape(h, d, -1)  # (h, d, C)
        if DEC_OPTIONS["ft"]:
            ft = torch.matmul(wq.transpose(1, 2), k.transpose(2, 3)) * scale  # (B, h, C, T)
            ft = ft.permute(0, 2, 1, 3).reshape(B, -1, h * T)
        else:
            ft = (torch.matmul(k, wq) * scale).reshape(B, h * T, -1).transpose(1, 2)
        fb = (torch.matmul(k, attn.q_proj.bias.reshape(h, d, 1)) * scale).reshape(B, 1, h * T)
        s = torch.matmul(q_image, ft) + fb  # (B, HW, hT)
        hw = s.shape[1]
        a = s.reshape(B, hw, h, T).softmax(dim=-1).reshape(B, hw, h * T)
        v = attn.v_proj(v_tokens).reshape(B, T, h, d).transpose(1, 2)  # (B, h, T, d)
        wo = attn.out_proj.weight.reshape(-1, h, d).permute(1, 2, 0)  # (h, d, C)
        u = torch.matmul(v, wo).reshape(B, h * T, -1)  # (B, hT, C)
        return torch.matmul(a, u) + attn.out_proj.bias

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        dec = self.inner
        md = dec.mask_decoder
        tr = md.transformer
        sparse = dec.embed_points(point_coords, point_labels)
        B = sparse.shape[0]
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(B, -1, -1), sparse], dim=1)
        C, Hh, Ww = image_embeddings.shape[1:]
        image_cf = image_embeddings.flatten(2)  # (1, C, HW)
        image = image_cf.transpose(1, 2)  # (1, HW, C)
        has = has_mask_input.reshape(-1, 1, 1)
        if DEC_OPTIONS["lowrank"]:
            feats_cf = self.mask_features(mask_input).flatten(2)  # (B, r, HW)
            feats_cl = feats_cf.transpose(1, 2)  # (B, HW, r)
            dense = has * (torch.matmul(feats_cl, self.mask_w.t()) + self.mask_b) + (1 - has) * self.no_mask
            keys = image + dense
        else:
            dense = dec.embed_masks(mask_input, has_mask_input)
            keys = image + dense.flatten(2).transpose(1, 2)  # (B, HW, C)
        pe = self.pe_tokens
        queries, query_pe = tokens, tokens
        for index, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            k_pe = keys + pe
            if index == 0 and DEC_OPTIONS["hoist"]:
                update = self._token_to_image_l0(layer.cross_attn_token_to_image,
                                                 queries + query_pe, image_cf, feats_cf,
                                                 feats_cl, has_mask_input)
            else:
                update = self._token_to_image(layer.cross_attn_token_to_image,
                                              queries + query_pe, k_pe, keys)
            queries = layer.norm2(queries + update)
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(keys + self._image_to_token(
                layer.cross_attn_image_to_token, k_pe, queries + query_pe, queries))
        queries = tr.norm_final_attn(queries + self._token_to_image(
            tr.final_attn_token_to_image, queries + query_pe, keys + pe, keys))
        iou_out = queries[:, 0, :]
        mask_out = queries[:, 1: 1 + md.num_mask_tokens, :]
        # upscaling: two 2x2/stride-2 transposed convs as per-pixel matmuls, channels last
        y = torch.matmul(keys, self.up1_w) + self.up1_b  # (B, HW, 4*c1)
        y = y.reshape(B, Hh * Ww * 4, self.up1_out)
        y = F.layer_norm(y, (self.up1_out,), self.ln_w, self.ln_b, self.ln_eps)
        y = F.gelu(y)
        y = torch.matmul(y, self.up2_w) + self.up2_b  # (B, HW*4, 4*c2)
        y = F.gelu(y).reshape(B, Hh * Ww * 16, self.up2_out)
        hyper = torch.stack(
            [mlp(mask_out[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
        k = hyper.shape[1]
        masks = torch.matmul(hyper, y.transpose(1, 2))  # (B, K, HW*16) in (i, j, di, dj, ei, ej)
        masks = masks.reshape(B * k, Hh, Ww, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        masks = masks.reshape(B, k, Hh * 4, Ww * 4)
        return masks, md.iou_prediction_head(iou_out)
