"""Synthetic checkpoints in exactly the layouts the upstream projects save (random values).

Written from the upstream save functions, independently of samedge's loaders, so the loader tests
can fail: key names, wrappers and shapes follow ``LoRA_Sam.save_lora_parameters`` (SAMed, SAMed_s),
``Fact_tt_Sam.save_parameters`` (MA-SAM) and Med-SA's ``save_checkpoint`` of its whole Sam.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from samedge.models.sam import SamConfig

# A tiny ViT: width 64, 4 blocks, 2 heads (hd 32), block 2 global; SAM base at 256 (rel-pos 31).
TINY = SamConfig(embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(2,), image_size=256,
                 prompt_dim=64)
DECODER = dict(mlp_dim=128, iou_hidden=64)


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Random values; shape-only meta tensors under ``with torch.device("meta")`` (key counts)."""
    if torch.empty(0).is_meta:
        return torch.empty(shape)
    return torch.randn(*shape, generator=gen) * scale


def _randomize(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values everywhere (zero-initialised pos_embed/rel-pos too); norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_meta:
            out[k] = v
            continue
        t = torch.randn(v.shape, generator=gen) * 0.05
        if v.ndim == 1 and k.endswith("weight"):
            t = t + 1.0
        if "rel_pos" in k or "pos_embed" in k:
            t = t * 4
        out[k] = t.contiguous()
    return out


def sam_modules(config: SamConfig, num_multimask_outputs: int = 3, mlp_dim: int = 128,
                iou_hidden: int = 64, image_size: int | None = None) -> dict[str, nn.Module]:
    """segment-anything's three parts, as ``_build_sam`` makes them (sizes as given)."""
    size = image_size or config.image_size
    grid = size // config.patch_size
    return {
        "image_encoder": ImageEncoderViT(
            depth=config.depth, embed_dim=config.embed_dim, img_size=size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=config.num_heads,
            patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=list(config.global_attn_indexes), window_size=config.window_size,
            out_chans=config.prompt_dim),
        "prompt_encoder": PromptEncoder(embed_dim=config.prompt_dim, image_embedding_size=(grid, grid),
                                        input_image_size=(size, size), mask_in_chans=16),
        "mask_decoder": MaskDecoder(
            num_multimask_outputs=num_multimask_outputs,
            transformer=TwoWayTransformer(depth=2, embedding_dim=config.prompt_dim, mlp_dim=mlp_dim,
                                          num_heads=8),
            transformer_dim=config.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden),
    }


def _state(parts: dict[str, nn.Module], seed: int) -> dict[str, torch.Tensor]:
    state = {f"{name}.{k}": v for name, m in parts.items() for k, v in m.state_dict().items()}
    return _randomize(state, seed)


def sam_base(config: SamConfig = TINY, seed: int = 0, **decoder) -> dict[str, torch.Tensor]:
    """Meta's flat SAM state dict (sam_vit_b_01ec64.pth layout) at ``config.image_size``."""
    return _state(sam_modules(config, **{**DECODER, **decoder}), seed)


def samed_file(config: SamConfig = TINY, image_size: int = 128, rank: int = 4, num_classes: int = 3,
               decoder_lora: bool = False, seed: int = 1, **decoder) -> dict[str, torch.Tensor]:
    """``LoRA_Sam.save_lora_parameters``: w_a_/w_b_ per (block, q|v), prompt encoder, decoder."""
    gen = torch.Generator().manual_seed(seed)
    c = config.embed_dim
    out = {}
    for k in range(2 * config.depth):
        out[f"w_a_{k:03d}"] = _rand(gen, rank, c, scale=0.1)
    for k in range(2 * config.depth):
        out[f"w_b_{k:03d}"] = _rand(gen, c, rank, scale=0.1)
    if decoder_lora:
        d = config.prompt_dim
        for prefix, out_dim in (("sa", d), ("cti", d // 2), ("cit", d // 2)):
            for j in range(4):
                out[f"{prefix}_a_{j:03d}"] = _rand(gen, rank, d, scale=0.1)
            for j in range(4):
                out[f"{prefix}_b_{j:03d}"] = _rand(gen, out_dim, rank, scale=0.1)
    parts = sam_modules(config, num_classes, image_size=image_size, **{**DECODER, **decoder})
    for k, v in _state(parts, seed).items():
        if k.startswith("prompt_encoder.") or (k.startswith("mask_decoder.") and not (decoder_lora and "transformer" in k)):
            out[k] = v
    if decoder_lora:
        d = config.prompt_dim
        out["fati_qa"] = _rand(gen, rank, d, scale=0.1)
        out["fati_qb"] = _rand(gen, d // 2, rank, scale=0.1)
        out["fati_va"] = _rand(gen, rank, d, scale=0.1)
        out["fati_vb"] = _rand(gen, d // 2, rank, scale=0.1)
    return out


def masam_decoder(config: SamConfig, num_classes: int, mlp_dim: int, iou_hidden: int) -> MaskDecoder:
    """MA-SAM's MaskDecoder: K+1 tokens, ConvT/LN2d/GELU ×3 + ConvT/GELU, hypernetworks → dim/32."""
    dim = config.prompt_dim
    decoder = MaskDecoder(
        num_multimask_outputs=num_classes,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=8),
        transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden)
    decoder.output_upscaling = nn.Sequential(
        nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
        nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), LayerNorm2d(dim // 8), nn.GELU(),
        nn.ConvTranspose2d(dim // 8, dim // 16, 2, 2), LayerNorm2d(dim // 16), nn.GELU(),
        nn.ConvTranspose2d(dim // 16, dim // 32, 2, 2), nn.GELU())
    decoder.output_hypernetworks_mlps = nn.ModuleList(
        MLP(dim, dim, dim // 32, 3) for _ in range(num_classes + 1))
    return decoder


def masam_file(config: SamConfig = TINY, image_size: int = 128, rank: int = 8, num_classes: int = 4,
               channels: int = 384, seed: int = 2, **decoder) -> dict[str, torch.Tensor]:
    """``Fact_tt_Sam.save_parameters``: q_/v_FacTs_NNN, FacTu/FacTv, prompt encoder, decoder,
    and every ``.adapter_`` tensor under image_encoder.ImageEncoderViT.blocks.{i}.Block."""
    gen = torch.Generator().manual_seed(seed)
    c = config.embed_dim
    dec = {**DECODER, **decoder}
    out = {f"q_FacTs_{i:03d}": _rand(gen, rank, rank, scale=0.3) for i in range(config.depth)}
    out |= {f"v_FacTs_{i:03d}": _rand(gen, rank, rank, scale=0.3) for i in range(config.depth)}
    out["image_encoder.FacTu.weight"] = _rand(gen, rank, c, scale=0.1)
    out["image_encoder.FacTv.weight"] = _rand(gen, c, rank, scale=0.1)
    grid = image_size // config.patch_size
    prompt = PromptEncoder(embed_dim=config.prompt_dim, image_embedding_size=(grid, grid),
                           input_image_size=(image_size, image_size), mask_in_chans=16)
    parts = {"prompt_encoder": prompt,
             "mask_decoder": masam_decoder(config, num_classes, dec["mlp_dim"], dec["iou_hidden"])}
    out |= _state(parts, seed)
    for i in range(config.depth):
        p = f"image_encoder.ImageEncoderViT.blocks.{i}.Block."
        for s in ("", "_2"):
            out[f"{p}adapter_linear_down{s}.weight"] = _rand(gen, channels, c, scale=0.05)
            out[f"{p}adapter_linear_up{s}.weight"] = _rand(gen, c, channels, scale=0.05)
            out[f"{p}adapter_conv{s}.weight"] = _rand(gen, channels, channels, 3, 1, 1, scale=0.03)
            out[f"{p}adapter_conv{s}.bias"] = _rand(gen, channels, scale=0.05)
            out[f"{p}adapter_norm{s}.weight"] = 1 + _rand(gen, c, scale=0.05)
            out[f"{p}adapter_norm{s}.bias"] = _rand(gen, c, scale=0.05)
    return out


def medsa_state(config: SamConfig = TINY, mode: str = "adapter", rel: str | None = "rel",
                rel_values: str = "zeros", decoder_style: str = "medsa", outputs: int = 1,
                lora_rank: int = 4, seed: int = 3, **decoder) -> dict[str, torch.Tensor]:
    """The whole Med-SA Sam state dict at ``config.image_size``.

    ``mode`` adapter (Space_/MLP_/Depth_Adapter, hidden C/4) or lora (loralib lora_A/lora_B);
    ``rel`` "rel" (rel_h|w, zero-initialised and never loaded), "rel_pos" (rel_pos_h|w) or None;
    sam_lora's global rel-pos is sized for a 64×64 grid at any input size; pos_embed is always
    (1, 64, 64, C); ``decoder_style`` "medsa" renames the decoder MLP to EfficientSAM's keys.
    """
    gen = torch.Generator().manual_seed(seed + 100)
    c, hd = config.embed_dim, config.embed_dim // config.num_heads
    parts = sam_modules(config, max(4, outputs) - 1, **{**DECODER, **decoder})
    state = _state(parts, seed)
    out = {}
    for k, v in state.items():
        if ".attn.rel_pos_" in k:
            if rel is None:
                continue
            block = int(k.split(".")[2])
            if mode == "lora" and block in config.global_attn_indexes:
                v = _rand(gen, 127, hd)
            if rel_values == "zeros":
                v = torch.zeros_like(v)
            k = k.replace("rel_pos_", f"{rel}_")
        if decoder_style == "medsa" and ".mlp.lin" in k and k.startswith("mask_decoder."):
            k = k.replace(".mlp.lin1.", ".mlp.layers.0.0.").replace(".mlp.lin2.", ".mlp.fc.")
        out[k] = v
    out["image_encoder.pos_embed"] = _rand(gen, 1, 64, 64, c, scale=0.2)
    for i in range(config.depth):
        p = f"image_encoder.blocks.{i}."
        if mode == "adapter":
            for name in ("MLP_Adapter", "Space_Adapter", "Depth_Adapter"):
                out[f"{p}{name}.D_fc1.weight"] = _rand(gen, c // 4, c, scale=0.1)
                out[f"{p}{name}.D_fc1.bias"] = _rand(gen, c // 4, scale=0.1)
                out[f"{p}{name}.D_fc2.weight"] = _rand(gen, c, c // 4, scale=0.1)
                out[f"{p}{name}.D_fc2.bias"] = _rand(gen, c, scale=0.1)
        else:
            r = lora_rank
            shapes = {"attn.qkv": ((2 * r, c), (2 * c, r)), "mlp.lin1": ((r, c), (4 * c, r)),
                      "mlp.lin2": ((r, 4 * c), (c, r))}
            for name, (a, b) in shapes.items():
                out[f"{p}{name}.lora_A"] = _rand(gen, *a, scale=0.2)
                out[f"{p}{name}.lora_B"] = _rand(gen, *b, scale=0.2)
    return out


def medsa_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """``utils.save_checkpoint``'s wrapper as train.py fills it."""
    return {
        "epoch": 7,
        "model": "sam",
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]},
        "best_tol": 0.8123,
        "path_helper": {"prefix": "logs/msa_test", "ckpt_path": "logs/msa_test/Model"},
    }


SMALL = replace(TINY, depth=3)  # width 64, 2 heads, block 2 global; SAM base at 256


def audible(state: dict, gain: float = 50.0) -> dict:
    """Synthetic decoders answer with logits of ~0.05, real ones with O(1–10): scale the
    hypernetwork heads so the 1e-4 logit bound and the label agreement say something."""
    head = re.compile(r"mask_decoder\.output_hypernetworks_mlps\.\d+\.layers\.2\.")
    return {k: v * gain if head.match(k) else v for k, v in state.items()}


def sam_adapter_state(config: SamConfig = TINY, seed: int = 4, scale_factor: int = 32,
                      **decoder) -> dict[str, torch.Tensor]:
    """SAM-Adapter's ``train.py`` save: ``model.state_dict()`` of its ``SAM`` (``models/sam.py``)
    at ``config.image_size`` — SAM's ViT plus ``image_encoder.prompt_generator.*`` (hidden width
    C / scale_factor), SAM's 4-token decoder, ``pe_layer`` and ``no_mask_embed``; no prompt encoder."""
    gen = torch.Generator().manual_seed(seed + 100)
    c, p, d = config.embed_dim, config.patch_size, config.prompt_dim
    hidden = c // scale_factor
    parts = sam_modules(config, **{**DECODER, **decoder})
    out = _state({"image_encoder": parts["image_encoder"], "mask_decoder": parts["mask_decoder"]},
                 seed)
    g = "image_encoder.prompt_generator."
    out[g + "shared_mlp.weight"] = _rand(gen, c, hidden, scale=0.3)
    out[g + "shared_mlp.bias"] = _rand(gen, c, scale=0.1)
    out[g + "embedding_generator.weight"] = _rand(gen, hidden, c, scale=0.3)
    out[g + "embedding_generator.bias"] = _rand(gen, hidden, scale=0.1)
    for i in range(config.depth):
        out[f"{g}lightweight_mlp_{i}.0.weight"] = _rand(gen, hidden, hidden, scale=0.5)
        out[f"{g}lightweight_mlp_{i}.0.bias"] = _rand(gen, hidden, scale=0.1)
    out[g + "prompt_generator.proj.weight"] = _rand(gen, hidden, 3, p, p, scale=0.1)
    out[g + "prompt_generator.proj.bias"] = _rand(gen, hidden, scale=0.1)
    out["pe_layer.positional_encoding_gaussian_matrix"] = _rand(gen, 2, d // 2)
    out["no_mask_embed.weight"] = _rand(gen, 1, d, scale=0.1)
    return out
