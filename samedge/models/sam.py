"""SAM ViT-B/L/H from the ``segment-anything`` package, and MedSAM (a fine-tuned ViT-B).

The sizes are data (:class:`SamConfig`) so tests can build a reduced ViT with random weights and
the adaptation families can rebuild a base encoder at another input size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from samedge.models.card import ModelCard
from samedge.models.checkpoint import file_sha256, load_into, load_state_dict
from samedge.models.family import CHECKPOINT, VARIANT, Family
from samedge.runtime.transforms import Preprocessing

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of segment-anything's ``_build_sam`` (image size and decoder heads too)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_dim: int = 256
    num_multimask_outputs: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


SAM_VARIANTS = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
}


def vit_encoder(config: SamConfig, out_chans: int) -> torch.nn.Module:
    """segment-anything's ``ImageEncoderViT`` for ``config``, as its builders make it (random
    weights); SAM itself and the adaptation families that rebuild its encoder share it."""
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        depth=config.depth, embed_dim=config.embed_dim, img_size=config.image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=config.num_heads,
        patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=list(config.global_attn_indexes), window_size=config.window_size,
        out_chans=out_chans,
    )


def sam_modules(config: SamConfig) -> torch.nn.Module:
    """An un-initialised-weights ``Sam`` built exactly as segment-anything's builders do."""
    from segment_anything.modeling import (
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = config.grid
    return Sam(
        image_encoder=vit_encoder(config, config.prompt_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=config.prompt_dim, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=config.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def resolve_config(variant: str, config: SamConfig | None) -> SamConfig:
    if config is not None:
        return config
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)}")
    return SAM_VARIANTS[variant]


def _modules(config: SamConfig, checkpoint: str | Path | None) -> torch.nn.Module:
    """SAM's modules; without a checkpoint built under a fixed seed, since construction draws
    random numbers (Conv init, the prompt encoder's Gaussian matrix) that would otherwise depend
    on whatever ran before in the process. The caller's random state is left as it was."""
    if checkpoint is not None:
        return sam_modules(config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return sam_modules(config)


def _load(model: torch.nn.Module, checkpoint: str | Path | None, family: str) -> dict:
    """Load weights (or seed random ones) and return the manifest's checkpoint record."""
    if checkpoint is None:
        torch.manual_seed(0)
        for module in model.modules():  # deterministic random weights for parity checks
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.02)
        return {"path": None, "sha256": None, "weights": "random (seed 0)"}
    load_into(model, load_state_dict(checkpoint), family)
    return {"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint)}


def sam_preprocessing(config: SamConfig) -> Preprocessing:
    """SamPredictor: ResizeLongestSide (Pillow bilinear on uint8), mean/std, pad; masks through
    postprocess_masks, logits > 0."""
    return Preprocessing(image_size=config.image_size, resize="longest_side",
                         interpolation="pil_bilinear", normalize="mean_std",
                         pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD,
                         mask_size=4 * config.grid)


def medsam_preprocessing(config: SamConfig) -> Preprocessing:
    """MedSAM_Inference.py: skimage resize to S² (order 3, anti-aliased) truncated to uint8,
    min-max; masks: sigmoid of the low-res logits, bilinear straight to the image, > 0.5."""
    return Preprocessing(image_size=config.image_size, resize="stretch",
                         interpolation="skimage_cubic", resized_cast="truncate",
                         normalize="minmax", mask_size=4 * config.grid, mask_path="direct",
                         mask_resize="probabilities", mask_threshold=0.5)


def build_sam(
    variant: str = "vit_b", checkpoint: str | Path | None = None, config: SamConfig | None = None
) -> ModelCard:
    """Meta's SAM: ResizeLongestSide (PIL bilinear), mean/std in 0–255, pad, multimask output."""
    record_config = config
    config = resolve_config(variant, config)
    model = _modules(config, checkpoint)
    record = _load(model, checkpoint, f"SAM {variant}")
    if record_config is not None:
        record["config"] = asdict(config)
    model.eval()
    pre = sam_preprocessing(config)
    return ModelCard("sam", variant if config == SAM_VARIANTS.get(variant) else "custom", model, pre, prompt="points", multimask_default=True,
                     checkpoint=record)


def build_medsam(checkpoint: str | Path | None = None, config: SamConfig | None = None) -> ModelCard:
    """MedSAM (ViT-B fully fine-tuned): the image is stretched to 1024² (aspect not kept), min-max
    scaled to [0, 1] and fed without mean/std; boxes scale by 1024/W, 1024/H; one output token.

    """
    config = replace(resolve_config("vit_b", config))
    model = _modules(config, checkpoint)
    record = _load(model, checkpoint, "MedSAM (SAM ViT-B)")
    model.eval()
    pre = medsam_preprocessing(config)
    return ModelCard("medsam", "vit_b", model, pre, prompt="boxes", multimask_default=False,
                     checkpoint=record,
                     notes=["MedSAM_Inference.py: skimage resize to 1024² (order 3, anti-aliased), "
                            "truncated to uint8, min-max; masks: sigmoid of the 256² logits, "
                            "bilinear to the image, > 0.5"])



def _custom_config(model) -> str | None:
    if "config" in (model.get("checkpoint") or {}):
        return "it was exported from a custom-configured SAM"
    return None


SAM_FAMILY = Family(
    name="sam",
    summary="Meta's SAM ViT-B/L/H (segment-anything checkpoints, or random weights)",
    build=build_sam,
    options=(VARIANT, CHECKPOINT),
    rebuildable=_custom_config,
)
MEDSAM_FAMILY = Family(
    name="medsam",
    summary="MedSAM: SAM ViT-B fully fine-tuned on medical images",
    build=build_medsam,
    options=(CHECKPOINT,),
    rebuildable=_custom_config,
)
