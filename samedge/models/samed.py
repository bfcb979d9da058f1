"""SAMed (hitachinsk/SAMed): LoRA on the encoder's q and v, a prompt-free K+1-token decoder.

Checkpoint (``LoRA_Sam.save_lora_parameters``): a flat dict saved to ``.pth`` holding
``w_a_{k:03d}`` (r, C) and ``w_b_{k:03d}`` (C, r) with k = 2·block + (0 q, 1 v), no scaling, plus
every ``prompt_encoder.*`` and ``mask_decoder.*`` tensor (K+1 mask tokens: background + classes).
SAMed_s adds decoder LoRA (``sa_/cti_/cit_`` a/b pairs with j = 2·layer + (0 q, 1 v), and
``fati_qa/qb/va/vb``) and leaves the decoder transformer to the base.

The frozen encoder is not saved: it is rebuilt from the SAM checkpoint exactly as SAMed's
``load_from`` does (pos_embed bilinear to S/16, global rel-pos bilinear as a 1×1×L×hd image to
2·S/16−1). The SAMed code picks the "global" rel-pos keys by substring ('2','5','8','11' in the
key: right for ViT-B, wrong for ViT-L), SAMed_h by block index; both rules are reproduced.
"""

from __future__ import annotations

import copy
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
from samedge.models.family import (
    BASE,
    CHECKPOINT,
    IMAGE_SIZE,
    NUM_CLASSES,
    RANK,
    VARIANT,
    Family,
    Option,
)
from samedge.models.folding import (
    fold_linear,
    fold_qv,
    folded_attention,
    low_rank,
    token_grid,
)
from samedge.models.infer import (
    infer_decoder,
    infer_encoder,
    looks_like,
    mask_decoder_from,
    prompt_encoder_for,
    variant_name,
)
from samedge.models.sam import SamConfig, vit_encoder
from samedge.models.vit_blocks import Block, Encoder, SamParts
from samedge.runtime.transforms import Preprocessing

GlobalRule = Literal["substring", "index"]
SAMED_CT_WINDOW = (75.0, 400.0)  # HU clip [-125, 275] → [0, 1] (preprocess/preprocess_data.py)
EXCEPT_KEYS = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head")
DECODER_LORA = {"sa": "self_attn", "cti": "cross_attn_token_to_image",
                "cit": "cross_attn_image_to_token"}


def global_rel_pos_keys(keys, rule: GlobalRule, global_attn_indexes) -> list[str]:
    """The rel-pos keys SAMed's ``load_from`` resizes as global.

    ``substring`` is the SAMed (ViT-B/L) code: ``'2' in k or '5' in k or '8' in k or '11' in k``,
    which for ViT-B is exactly blocks 2, 5, 8, 11 but for deeper encoders also catches windowed
    blocks (12, 15, 20, ...) and misses global ones (17). ``index`` is SAMed_h / MA-SAM:
    ``int(k.split('.')[2]) in global_attn_indexes``.
    """
    rel = [k for k in keys if "rel_pos" in k]
    if rule == "substring":
        return [k for k in rel if "2" in k or "5" in k or "8" in k or "11" in k]
    return [k for k in rel if int(k.split(".")[2]) in global_attn_indexes]


def samed_load_from(model_keys, base: dict[str, torch.Tensor], image_size: int, patch_size: int,
                    rule: GlobalRule, global_attn_indexes) -> dict[str, torch.Tensor]:
    """SAMed's ``build_sam.load_from``: base tensors the model has, minus the K-dependent decoder
    heads, with pos_embed and the rule's rel-pos keys resized when the token grid changed."""
    model_keys = list(model_keys)
    new = {k: v for k, v in base.items()
           if k in model_keys and not any(e in k for e in EXCEPT_KEYS)}
    token_size = image_size // patch_size
    pos_embed = new["image_encoder.pos_embed"]
    if pos_embed.shape[1] != token_size:
        pos_embed = F.interpolate(pos_embed.permute(0, 3, 1, 2), (token_size, token_size),
                                  mode="bilinear", align_corners=False)
        new["image_encoder.pos_embed"] = pos_embed.permute(0, 2, 3, 1)
        for key in global_rel_pos_keys(model_keys, rule, global_attn_indexes):
            rel = new[key]
            resized = F.interpolate(rel[None, None], (token_size * 2 - 1, rel.shape[1]),
                                    mode="bilinear", align_corners=False)
            new[key] = resized[0, 0]
    return new


class LoRAqkv(nn.Module):
    """SAMed's ``_LoRA_qkv``: ``qkv(x)`` with ``B_q A_q x`` added in place to the q columns and
    ``B_v A_v x`` to the v columns (the slice-adds export as ScatterND; merging removes them)."""

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__()
        self.qkv, self.dim = qkv, qkv.in_features
        self.linear_a_q = nn.Linear(self.dim, rank, bias=False)
        self.linear_b_q = nn.Linear(rank, self.dim, bias=False)
        self.linear_a_v = nn.Linear(self.dim, rank, bias=False)
        self.linear_b_v = nn.Linear(rank, self.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        new_q = self.linear_b_q(self.linear_a_q(x))
        new_v = self.linear_b_v(self.linear_a_v(x))
        qkv[:, :, :, : self.dim] += new_q
        qkv[:, :, :, -self.dim:] += new_v
        return qkv


class LoRAProj(nn.Module):
    """SAMed_s's ``_LoRA_qkv_proj`` on a decoder projection: ``proj(x) + w_b(w_a(x))``."""

    def __init__(self, proj: nn.Linear, rank: int):
        super().__init__()
        self.proj = proj
        self.w_a = nn.Linear(proj.in_features, rank, bias=False)
        self.w_b = nn.Linear(rank, proj.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.w_b(self.w_a(x))


def read_sam_base(path: str | Path) -> dict[str, torch.Tensor]:
    """A SAM checkpoint (flat state dict) to rebuild a frozen encoder from."""
    state = load_state_dict(path, "SAM base checkpoint")
    if "image_encoder.blocks.0.attn.qkv.weight" not in state:
        raise FamilyMismatchError(
            f"base {path} is not a SAM checkpoint with an image encoder; it looks like "
            f"{looks_like(state)}",
            hint="pass Meta's sam_vit_b/l/h checkpoint (the one the adaptation was trained on) as base",
        )
    return state


def _indexed(state: dict, prefix: str) -> dict[int, torch.Tensor]:
    return {int(m.group(1)): v for k, v in state.items() if (m := re.fullmatch(prefix + r"(\d{3})", k))}


def read_samed(path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA file, checked to be SAMed's layout (pairs complete, one rank, q/v per block)."""
    state = load_state_dict(path, "SAMed checkpoint")
    a, b = _indexed(state, "w_a_"), _indexed(state, "w_b_")
    if not a:
        raise FamilyMismatchError(
            f"{path} is not a SAMed LoRA checkpoint (no w_a_NNN keys); it looks like "
            f"{looks_like(state)}",
            hint="use the family that matches the file (masam, medsa, sam ...)",
        )
    if sorted(a) != list(range(len(a))) or sorted(b) != sorted(a) or len(a) % 2:
        raise KeyMismatchError(
            f"{path}: SAMed LoRA keys are incomplete: w_a indices {sorted(a)[:8]}..., w_b indices "
            f"{sorted(b)[:8]}... (expected w_a_000..w_a_{len(a) - 1:03d} and matching w_b, 2 per block)",
            hint="the file is truncated or edited; use the file written by save_lora_parameters",
        )
    ranks = {tuple(t.shape) for t in a.values()} | {tuple(t.shape[::-1]) for t in b.values()}
    if len(ranks) != 1:
        raise KeyMismatchError(f"{path}: LoRA A/B shapes disagree: {sorted(ranks)}")
    return state


def _check_lora_fits(lora: dict, base_config: SamConfig, rank: int | None, path) -> int:
    a = _indexed(lora, "w_a_")
    r, width = (int(s) for s in a[0].shape)
    blocks = len(a) // 2
    if width != base_config.embed_dim or blocks != base_config.depth:
        raise FamilyMismatchError(
            f"SAMed LoRA {path} has w_a_000 {tuple(a[0].shape)} for {blocks} blocks (a width-"
            f"{width}, depth-{blocks} ViT) but the base encoder is width {base_config.embed_dim}, "
            f"depth {base_config.depth} ({variant_name(base_config)})",
            hint="pass the SAM checkpoint the LoRA was trained on as base "
                 "(width 768/1024/1280 = vit_b/vit_l/vit_h)",
        )
    if rank is not None and rank != r:
        raise KeyMismatchError(f"SAMed LoRA {path} has rank {r} (w_a_000 {tuple(a[0].shape)}), not {rank}")
    return r


WRAPPED_PROJ = re.compile(
    r"(mask_decoder\.transformer\.(?:layers\.\d+\.\w+|final_attn_token_to_image)\.[qv]_proj)\."
)
LORA_WEIGHT = re.compile(r"\.(linear_[ab]_[qv]|w_[ab])\.weight$")


def _wrapped(key: str, decoder_lora: bool) -> str:
    """A plain SAM key → its name after LoRA_Sam's surgery (qkv and, SAMed_s, q/v_proj wrapped)."""
    key = re.sub(r"(blocks\.\d+\.attn\.qkv)\.", r"\1.qkv.", key)
    return WRAPPED_PROJ.sub(r"\1.proj.", key) if decoder_lora else key


def _plain(key: str) -> str:
    """Inverse of :func:`_wrapped` (the names SAMed's ``load_from`` sees, before the surgery)."""
    return re.sub(r"(\.qkv|_proj)\.(qkv|proj)\.", r"\1.", key)


def _lora_names(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """w_a_/w_b_ (k = 2·block + q|v) and SAMed_s sa_/cti_/cit_ (j = 2·layer + q|v), fati_*."""
    out = {}
    for k, v in lora.items():
        if m := re.fullmatch(r"w_([ab])_(\d{3})", k):
            block, which = divmod(int(m.group(2)), 2)
            out[f"image_encoder.blocks.{block}.attn.qkv.linear_{m.group(1)}_{'qv'[which]}.weight"] = v
        elif m := re.fullmatch(r"(sa|cti|cit)_([ab])_(\d{3})", k):
            layer, which = divmod(int(m.group(3)), 2)
            name = f"mask_decoder.transformer.layers.{layer}.{DECODER_LORA[m.group(1)]}"
            out[f"{name}.{'qv'[which]}_proj.w_{m.group(2)}.weight"] = v
        elif m := re.fullmatch(r"fati_([qv])([ab])", k):
            out[f"mask_decoder.transformer.final_attn_token_to_image.{m.group(1)}_proj.w_{m.group(2)}.weight"] = v
    return out


def _full_state(reference: nn.Module, base: dict, lora: dict, config: SamConfig,
                rule: GlobalRule, decoder_lora: bool) -> dict[str, torch.Tensor]:
    """The wrapped Sam's full state under upstream names: base through ``load_from``, then the
    file's prompt encoder and decoder over it (SAMed_s: decoder minus transformer), then LoRA."""
    plain_keys = [_plain(k) for k in reference.state_dict() if not LORA_WEIGHT.search(k)]
    state = samed_load_from(plain_keys, base, config.image_size, config.patch_size, rule,
                            config.global_attn_indexes)
    state.update({k: v for k, v in lora.items() if k.startswith(("prompt_encoder.", "mask_decoder."))})
    return {**{_wrapped(k, decoder_lora): v for k, v in state.items()}, **_lora_names(lora)}


def _check_rel_pos_rule(reference: nn.Module, full: dict, rule: GlobalRule, config: SamConfig) -> None:
    """Name the upstream cause when the rule resized the wrong rel-pos tensors (SAMed's substring
    rule on an encoder whose global blocks are not 2, 5, 8, 11): SAMed's own strict load fails
    there too, so no checkpoint can have been trained that way."""
    expected = reference.state_dict()
    wrong = [f"{k}: {tuple(full[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if "rel_pos" in k and k in full and full[k].shape != v.shape]
    if wrong:
        raise KeyMismatchError(
            f"SAMed's load_from with the {rule!r} global rel-pos rule does not fit this base at "
            f"image size {config.image_size} (global blocks {list(config.global_attn_indexes)}): "
            f"{wrong[:4]}; upstream SAMed fails to load here as well",
            hint="SAMed_h picks global blocks by index: pass variant='samed_h' if the model was "
                 "trained with that code, or build at the base's image size",
        )


def samed_reference(config: SamConfig, decoder_shape, rank: int, decoder_lora: bool) -> SamParts:
    """The Sam that ``LoRA_Sam`` wraps, with its surgery: same module tree and key names."""
    encoder = vit_encoder(config, decoder_shape.prompt_dim)
    for block in encoder.blocks:
        block.attn.qkv = LoRAqkv(block.attn.qkv, rank)
    decoder = mask_decoder_from(decoder_shape)
    if decoder_lora:
        transformer = decoder.transformer
        attns = [getattr(layer, n) for layer in transformer.layers for n in DECODER_LORA.values()]
        for attn in attns + [transformer.final_attn_token_to_image]:
            attn.q_proj = LoRAProj(attn.q_proj, rank)
            attn.v_proj = LoRAProj(attn.v_proj, rank)
    return SamParts(encoder, prompt_encoder_for(config, decoder_shape.prompt_dim), decoder)


def _decoder_shape(lora: dict, base: dict, num_classes: int | None, path):
    """Decoder sizes from the LoRA file (SAMed_s: the transformer sizes come from the base)."""
    shape = infer_decoder({**{k: v for k, v in base.items() if k.startswith("mask_decoder.transformer.")},
                           **lora}, f"SAMed checkpoint {path}")
    if num_classes is not None and num_classes + 1 != shape.num_mask_tokens:
        raise KeyMismatchError(
            f"SAMed checkpoint {path} has mask_decoder.mask_tokens.weight "
            f"{tuple(lora['mask_decoder.mask_tokens.weight'].shape)}: {shape.num_mask_tokens - 1} "
            f"classes + background, not num_classes={num_classes}",
            hint="leave num_classes unset to take it from the checkpoint",
        )
    return shape


def build_samed(
    base: str | Path,
    checkpoint: str | Path,
    image_size: int = 512,
    num_classes: int | None = None,
    rank: int | None = None,
    variant: Literal["samed", "samed_h", "samed_s"] | None = None,
    merged: bool = True,
    input_size: int | None = 224,
) -> ModelCard:
    """SAMed / SAMed_h / SAMed_s from Meta's SAM checkpoint (``base``) and the LoRA file.

    ``variant`` only decides the global rel-pos rule of ``load_from`` (SAMed_h: by index; SAMed and
    SAMed_s: the substring quirk) and is inferred: decoder LoRA keys → samed_s, a ViT-H base →
    samed_h, else samed. ``num_classes`` and ``rank`` are read from the file; passing them checks.
    ``card.model`` is the merged, exportable model; ``card.reference`` the upstream-faithful one.
    ``input_size``: test.py's ``--input_size`` (224): slices are zoomed to it, then to
    ``image_size``, as ``test_single_volume`` does; None zooms straight to ``image_size``.
    """
    base_state = read_sam_base(base)
    lora = read_samed(checkpoint)
    base_config = infer_encoder(base_state, what=f"SAM base {base}")
    r = _check_lora_fits(lora, base_config, rank, checkpoint)
    decoder_lora = any(re.fullmatch(r"sa_a_\d{3}", k) for k in lora)
    if variant is None:
        variant = "samed_s" if decoder_lora else "samed_h" if base_config.embed_dim == 1280 else "samed"
    if decoder_lora != (variant == "samed_s"):
        raise FamilyMismatchError(
            f"variant={variant!r} but the file {'has' if decoder_lora else 'has no'} decoder LoRA keys "
            "(sa_a_000 ...)", hint="leave variant unset to infer it")
    rule: GlobalRule = "index" if variant == "samed_h" else "substring"
    shape = _decoder_shape(lora, base_state, num_classes, checkpoint)
    config = replace(base_config, image_size=image_size, prompt_dim=shape.prompt_dim,
                     num_multimask_outputs=shape.num_mask_tokens - 1)
    reference = samed_reference(config, shape, r, decoder_lora)
    full = _full_state(reference, base_state, lora, config, rule, decoder_lora)
    _check_rel_pos_rule(reference, full, rule, config)
    load_into(reference, full, f"{variant} ({variant_name(base_config)}, image {image_size}, "
                               f"global rel-pos rule {rule!r})")
    reference.eval()
    return _card(reference, config, variant, merged, input_size, {
        "path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint),
        "base": str(Path(base).resolve()), "base_sha256": file_sha256(base), "rank": r,
        "global_rel_pos_rule": rule, "base_variant": variant_name(base_config),
        "input_size": input_size,
    })


def samed_preprocessing(image_size: int, mask_size: int, input_size: int | None) -> Preprocessing:
    """utils.test_single_volume: CT window → [0, 1] float, zoom (order 3) to ``input_size`` then
    to ``image_size``, each only where the slice differs; labels = argmax at the input size,
    zoomed back with order 0."""
    return Preprocessing(
        image_size=image_size, resize="stretch", interpolation="spline3", resize_via=input_size,
        normalize="unit", normalize_stage="before_resize", round_resized=False, source="float",
        mask_size=mask_size, ct_window=SAMED_CT_WINDOW, mask_resize="labels",
        mask_interpolation="spline0",
    )


def _card(reference: SamParts, config: SamConfig, variant: str, merged: bool,
          input_size: int | None, record: dict) -> ModelCard:

    model = merge_samed(reference) if merged else reference
    pre = samed_preprocessing(config.image_size, 4 * config.grid, input_size)
    return ModelCard(
        "samed", variant, model, pre, prompt="none", multimask_default=True, decoder="semantic",
        checkpoint=record, reference=reference,
        notes=[
            f"semantic decoder: {config.num_multimask_outputs + 1} logit channels (0 = background), "
            "label map = argmax; prompt-free (empty sparse prompt, no_mask_embed)",
            "slices zoomed with scipy order 3 to "
            + (f"{input_size}² then {config.image_size}²" if input_size else f"{config.image_size}²")
            + " (test_single_volume); label map zoomed back with order 0",
            "input = CT clipped to [-125, 275] HU scaled to [0, 1], no mean/std",
        ],
    )


def semantic_decode(model: nn.Module, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAMed/MA-SAM's prompt-free decoding of (B, C, h, w) embeddings → (B, K+1, m, m) logits
    and (B, K+1) IoU predictions.

    Prompt encoder with points=boxes=masks=None gives a (1, 0, C) sparse prompt and the
    no-mask dense embedding; the single token batch broadcasts against the B images inside the
    decoder; every mask token is returned (the upstream slicing is commented out). A model with
    its own prompt-free head (SAM-Adapter: mask token 0 as a binary map) decodes itself.
    """
    if hasattr(model, "prompt_free_decode"):
        return model.prompt_free_decode(embeddings)
    sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=None)
    return model.mask_decoder.predict_masks(
        image_embeddings=embeddings, image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
    )


def semantic_forward(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAMed/MA-SAM ``forward_train`` after ``preprocess`` (mean 0, std 1, no pad at S×S)."""
    embeddings = model.image_encoder(images)
    low_res, iou = semantic_decode(model, embeddings)
    size = model.image_encoder.img_size
    masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    return {"embeddings": embeddings, "low_res_logits": low_res, "iou_predictions": iou,
            "masks": masks}


@torch.no_grad()
def reference_forward(card_or_model: ModelCard | nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Upstream SAMed inference on (B, 3, S, S) inputs; a card runs its unmerged reference."""
    model = card_or_model.reference if isinstance(card_or_model, ModelCard) else card_or_model
    if model is None:
        raise CheckpointError("this card has no reference model")
    return semantic_forward(model, images)


# -- merge: fold the linear updates into the frozen weights -------------------------------------
def merge_samed(reference: SamParts) -> SamParts:
    """SAMed/SAMed_h/SAMed_s: plain SAM blocks with LoRA folded into qkv (and decoder q/v)."""
    enc = reference.image_encoder
    grid = token_grid(enc)
    blocks = []
    for blk in enc.blocks:
        lora = blk.attn.qkv
        qkv = fold_qv(lora.qkv, low_rank(lora.linear_b_q.weight, lora.linear_a_q.weight),
                      low_rank(lora.linear_b_v.weight, lora.linear_a_v.weight))
        attn = folded_attention(qkv, blk.attn.proj, blk.attn.num_heads,
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


FAMILY = Family(
    name="samed",
    summary="SAMed / SAMed_h / SAMed_s: LoRA on q/v, prompt-free semantic decoder",
    build=build_samed,
    options=(BASE, CHECKPOINT, VARIANT, IMAGE_SIZE, NUM_CLASSES, RANK,
             Option("input_size", "SAMed: test.py's --input_size, zoomed to before --image-size "
                                  "(default 224)", int)),
    decoder_graph="semantic",
    merge=merge_samed,
)
