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
