"""Med-SA (KidsWithTokens / SuperMedIntel Medical-SAM-Adapter): SAM with adapters, 2D or 3D.

Checkpoint (``utils.save_checkpoint``): ``{"epoch", "model": "sam", "state_dict", "optimizer",
"best_tol", "path_helper"}`` whose ``state_dict`` is the whole Sam (no ``module.`` prefix).

Encoder (``-mod sam_adpt``, the default): every block has ``Space_Adapter`` (skip, on the
attention output), ``MLP_Adapter`` (parallel to the MLP, ×0.5) and ``Depth_Adapter`` (3D only),
each ``D_fc2(GELU(D_fc1 x))`` with hidden int(0.25·C). ``-mod sam_lora`` instead puts loralib
LoRA (alpha 1 ⇒ scaling 1/r) on qkv (q and v) and on both MLP linears. ``pos_embed`` is always
(1, 64, 64, C) and bicubic-resized to the token grid on every call. Rel-pos parameters come in
three eras: ``rel_pos_h|w`` (loaded from SAM), none, and ``rel_h|w`` (never loaded: zeros).

Decoder (HEAD): ``max(4, n)`` mask tokens, output tokens ``0:n`` (n = ``-multimask_output``,
default 1) whatever the multimask flag says; since 2024-01-03 its TwoWayTransformer is
EfficientSAM's (``mlp.layers.0.0``/``mlp.fc`` keys; its first self-attention keeps a residual, and
later ones add the query PE into the queries themselves, values and residual included), before
that SAM's. Both are read from the keys.

3D (``-thd True -chunk D``): the batch is D slices; each block also attends over the slices of
every token (the leading dim regrouped ``(b d) h w c -> (b h w) d c``, D viewed as the
``closest_numbers(D)`` grid) with the same frozen attention, and adds ``Depth_Adapter`` of that.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from samedge.errors import CheckpointError, FamilyMismatchError, KeyMismatchError
from samedge.models.card import ModelCard
from samedge.models.checkpoint import file_sha256, load_into, load_state_dict
from samedge.models.family import BASE, CHECKPOINT, DEPTH, IMAGE_SIZE, Family, Option
from samedge.models.folding import (
    fold_linear,
    fold_qv,
    folded_attention,
    low_rank,
    token_grid,
)
from samedge.models.infer import (
    DecoderShape,
    infer_decoder,
    infer_encoder,
    looks_like,
    prompt_encoder_for,
    variant_name,
)
from samedge.models.medsa_blocks import (
    LORA_GLOBAL_GRID,
    LoRALinear,
    LoRAMergedLinear,
    MedSAAdapterBlock,
    MedSAImageEncoder,
    MedSALoraBlock,
    closest_numbers,
    medsa_mask_decoder,
)
from samedge.models.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, SamConfig
from samedge.models.vit_blocks import (
    AdapterBlock,
    Block,
    DepthRegroup,
    Encoder,
    SamParts,
)
from samedge.runtime.transforms import Preprocessing

Era = Literal["legacy", "2025"]


MEDSA_3D_CT_WINDOW = (37.5, 425.0)  # MONAI ScaleIntensityRange a_min -175, a_max 250 → [0, 1]


# -- loading ------------------------------------------------------------------------------------
def read_medsa(path: str | Path, base: str | Path | None = None) -> tuple[dict, str]:
    """The Med-SA state dict (unwrapped from its training checkpoint) and its encoder mode."""
    state = load_state_dict(path, "Med-SA checkpoint")
    if any(".Space_Adapter." in k for k in state):
        mode = "adapter"
    elif any(k.endswith("attn.qkv.lora_A") for k in state):
        mode = "lora"
    else:
        raise FamilyMismatchError(
            f"{path} is not a Med-SA checkpoint (no Space_Adapter or qkv lora_A keys); it looks "
            f"like {looks_like(state)}",
            hint="use the family that matches the file (samed, masam, sam ...)",
        )
    if base is not None:
        # Upstream loads SAM first (by name and shape) and then this dict over it; only the frozen
        # encoder and prompt-encoder tensors share SAM's names (rel-pos and the decoder do not).
        from samedge.models.samed import read_sam_base

        for k, v in read_sam_base(base).items():
            if k not in state and k.startswith(("image_encoder.", "prompt_encoder.")) and "rel_pos" not in k:
                state[k] = v
    return state, mode


def _rel_layout(state: dict, config: SamConfig, mode: str, path) -> tuple[str | None, dict]:
    """The rel-pos era's parameter name and per-block lengths, checked against the model size."""
    names = {m.group(1) for k in state if (m := re.search(r"\.attn\.(rel_pos|rel)_h$", k))}
    if len(names) > 1:
        raise KeyMismatchError(f"{path} mixes rel-pos names {sorted(names)}")
    name = next(iter(names), None)
    lengths: dict[int, tuple[int, int]] = {}
    if name is None:
        return None, lengths
    global_grid = LORA_GLOBAL_GRID if mode == "lora" else config.grid
    for i in range(config.depth):
        h, w = (state[f"image_encoder.blocks.{i}.attn.{name}_{a}"] for a in "hw")
        lengths[i] = (int(h.shape[0]), int(w.shape[0]))
        grid = global_grid if i in config.global_attn_indexes else config.window_size
        if lengths[i] != (2 * grid - 1, 2 * grid - 1):
            raise KeyMismatchError(
                f"{path}: image_encoder.blocks.{i}.attn.{name}_h is {tuple(h.shape)}, but a "
                f"{'global' if i in config.global_attn_indexes else 'windowed'} block of a Med-SA "
                f"{mode} model at image size {config.image_size} has {2 * grid - 1} positions",
                hint="pass the image_size the checkpoint was trained with (or leave it unset)",
            )
    return name, lengths


def medsa_reference(state: dict, mode: str, config: SamConfig, decoder_shape: DecoderShape,
                    outputs: int, depth: int, rel_layout: tuple[str | None, dict], path) -> SamParts:
    """Med-SA's Sam for this checkpoint: module tree and key names as upstream."""
    rel_name, lengths = rel_layout
    blocks = []
    for i in range(config.depth):
        window = 0 if i in config.global_attn_indexes else config.window_size
        args = (config.embed_dim, config.num_heads, window, rel_name, lengths.get(i))
        if mode == "adapter":
            fc1 = state[f"image_encoder.blocks.{i}.Space_Adapter.D_fc1.weight"]
            if fc1.shape[1] != config.embed_dim:
                raise KeyMismatchError(
                    f"{path}: Space_Adapter.D_fc1.weight {tuple(fc1.shape)} takes {fc1.shape[1]} "
                    f"features but the encoder width is {config.embed_dim} (-mid_dim != C)")
            blocks.append(MedSAAdapterBlock(*args, hidden=int(fc1.shape[0]), chunk=depth if depth > 1 else None))
        else:
            rank = int(state[f"image_encoder.blocks.{i}.attn.qkv.lora_A"].shape[0]) // 2
            blocks.append(MedSALoraBlock(*args, lora_rank=rank))
    pos_grid = int(state["image_encoder.pos_embed"].shape[1])
    encoder = MedSAImageEncoder(config, blocks, pos_grid, decoder_shape.prompt_dim)
    encoder.depth = depth
    return SamParts(encoder, prompt_encoder_for(config, decoder_shape.prompt_dim),
                    medsa_mask_decoder(decoder_shape, outputs))


def _outputs(shape: DecoderShape, multimask_output: int | None, path) -> int:
    tokens = shape.num_mask_tokens
    outputs = multimask_output if multimask_output is not None else (tokens if tokens > 4 else 1)
    if max(4, outputs) != tokens:
        raise KeyMismatchError(
            f"{path} has {tokens} mask tokens (mask_decoder.mask_tokens.weight) but "
            f"-multimask_output {outputs} builds max(4, {outputs}) = {max(4, outputs)}",
            hint="leave multimask_output unset to take it from the checkpoint",
        )
    return outputs


def medsa_preprocessing(config: SamConfig, era: Era, depth: int) -> Preprocessing:
    """2-D: Pillow bilinear stretch to S on the uint8 RGB image (torchvision's Resize before
    ToTensor), then legacy: [0, 1] straight into the encoder, (y, x) clicks; 2025: ×255 and SAM
    mean/std. 3-D (function.py's ``thd`` branch): the MONAI [0, 1] float volume (CT window
    [-175, 250]) resized as a tensor (bilinear; torchvision 0.13 in both eras' environments, no
    antialiasing), legacy straight in, 2025 through mean/std on the [0, 1] data (= mean/std ×255
    in the 0–255 scale); clicks stay (row, col). Masks: validation_sam resizes the low-res logits
    straight to the output size — legacy nearest, thresholded at 0.5 on logits (the centre of
    eval_seg's thresholds, applied to logits before 2025); 2025 bilinear, sigmoid > 0.5 (logits > 0)."""
    three_d = depth > 1
    if era == "legacy":
        norm = dict(normalize="unit")
        masks = dict(mask_interpolation="nearest", mask_threshold=0.5)
    else:
        scale = 255.0 if three_d else 1.0
        norm = dict(normalize="mean_std", pixel_mean=tuple(m * scale for m in SAM_PIXEL_MEAN),
                    pixel_std=tuple(s * scale for s in SAM_PIXEL_STD))
        masks = dict(mask_interpolation="bilinear", mask_threshold=0.0)
    resample = (dict(interpolation="bilinear", round_resized=False, source="float") if three_d
                else dict(interpolation="pil_bilinear"))
    return Preprocessing(
        image_size=config.image_size, resize="stretch",
        point_order="yx" if era == "legacy" or three_d else "xy", mask_size=4 * config.grid,
        ct_window=MEDSA_3D_CT_WINDOW if three_d else None, mask_path="direct", **resample,
        **norm, **masks,
    )


def build_medsa(
    checkpoint: str | Path,
    base: str | Path | None = None,
    depth: int = 1,
    era: Era = "legacy",
    image_size: int | None = None,
    num_heads: int | None = None,
    global_attn_indexes: tuple[int, ...] | None = None,
    multimask_output: int | None = None,
    merged: bool = True,
) -> ModelCard:
    """Med-SA from its training checkpoint (sam_adpt or sam_lora, any rel-pos era).

    ``depth`` > 1 builds the 3D model (``-thd True -chunk depth``): the encoder takes exactly
    ``depth`` adjacent slices as its batch. ``era`` picks the preprocessing of the code the model
    was trained with (the weights do not tell). ``image_size`` is read from the global rel-pos
    length where that follows it (sam_adpt with rel-pos); otherwise pass it. ``base`` (optional)
    fills frozen SAM tensors a file lacks, with Med-SA's name-and-shape rule.
    """
    if era not in ("legacy", "2025"):
        raise ValueError(f"era must be 'legacy' or '2025', not {era!r}")
    state, mode = read_medsa(checkpoint, base)
    if mode == "lora" and depth > 1:
        raise FamilyMismatchError(f"{checkpoint} is a sam_lora model; Med-SA's 3D branch exists only in sam_adpt")
    if depth > 1:
        closest_numbers(depth)
    what = f"Med-SA checkpoint {checkpoint}"
    config = infer_encoder(state, what=what, image_size=image_size, num_heads=num_heads,
                           global_attn_indexes=global_attn_indexes,
                           size_from_rel_pos=mode == "adapter", size_from_pos_embed=False)
    shape = infer_decoder(state, what)
    outputs = _outputs(shape, multimask_output, checkpoint)
    config = replace(config, prompt_dim=shape.prompt_dim, num_multimask_outputs=outputs)
    rel_layout = _rel_layout(state, config, mode, checkpoint)
    reference = medsa_reference(state, mode, config, shape, outputs, depth, rel_layout, checkpoint)
    load_into(reference, state, f"Med-SA {mode} ({variant_name(config)}, image {config.image_size})")
    reference.eval()


    model = merge_medsa(reference) if merged else reference
    rel = rel_layout[0]
    zero = rel is not None and not any(bool(v.abs().max() > 0) for k, v in state.items()
                                       if re.search(rf"\.attn\.{rel}_[hw]$", k))
    notes = [
        f"decoder returns mask tokens 0:{outputs} for either multimask flag "
        f"({shape.num_mask_tokens} tokens; {shape.transformer_style} two-way transformer)",
        f"encoder: {mode}, rel-pos parameters {rel or 'absent'}"
        + (" (all zero: dropped from the merged graph)" if zero else ""),
        "pos_embed (1, 64, 64, C) bicubic-resized to the token grid once, as a constant",
        "images are stretched to the square input (torchvision Resize: Pillow in 2-D, tensor "
        "bilinear in 3-D)",
        "low-res logits resized straight to the image, "
        + ("nearest, > 0.5 (legacy)" if era == "legacy" else "bilinear, > 0 (2025)"),
    ]
    if depth > 1:
        dh, dw = closest_numbers(depth)
        notes += [f"3D: the batch is {depth} adjacent slices, depth attention on a {dh}x{dw} grid; "
                  "in windowed blocks slices and windows mix as upstream does",
                  "3D clicks are (row, col) in the ROI frame before the resize to the input size"]
    return ModelCard(
        "medsa", variant_name(config), model, medsa_preprocessing(config, era, depth),
        prompt="points", multimask_default=False, decoder="prompt", depth=depth,
        reference=reference, notes=notes,
        checkpoint={"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint),
                    "mode": mode, "era": era, "rel_pos": rel,
                    **({"base": str(Path(base).resolve())} if base else {})},
    )


@torch.no_grad()
def reference_forward(card_or_model: ModelCard | nn.Module, images: torch.Tensor,
                      point_coords: torch.Tensor, point_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Med-SA's validation step on encoder-ready images (N, 3, S, S) and one prompt per image:
    points (N, P, 2) as passed to the prompt encoder (x, y in the S frame) with labels (N, P);
    boxes and masks are None, so a padding point is appended."""
    model = card_or_model.reference if isinstance(card_or_model, ModelCard) else card_or_model
    if model is None:
        raise CheckpointError("this card has no reference model")
    embeddings = model.image_encoder(images)
    sparse, dense = model.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
    decoder = model.mask_decoder
    low_res, iou = decoder(image_embeddings=embeddings, image_pe=model.prompt_encoder.get_dense_pe(),
                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                           multimask_output=decoder.num_multimask_outputs > 1)
    return {"embeddings": embeddings, "low_res_logits": low_res, "iou_predictions": iou}


# -- merge: fold the linear updates into the frozen weights -------------------------------------
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
    grid, depth = token_grid(enc), enc.depth
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
            attn = folded_attention(qkv, a.proj, a.num_heads, a.rel_pos, window, grid,
                              [regroup.grid] if regroup else [])
            blocks.append(AdapterBlock(blk.norm1, attn, blk.norm2, mlp, window, grid, blk.Space_Adapter,
                                       blk.MLP_Adapter, blk.scale,
                                       blk.Depth_Adapter if regroup else None, regroup))
        else:
            attn = folded_attention(qkv, a.proj, a.num_heads, a.rel_pos, window, grid)
            blocks.append(Block(blk.norm1, attn, blk.norm2, mlp, window, grid))
    with torch.no_grad():
        pos_embed = enc.resized_pos_embed((grid, grid))
    encoder = Encoder(enc.patch_embed, pos_embed, blocks, enc.neck, enc.img_size, depth)
    return SamParts(encoder, reference.prompt_encoder, reference.mask_decoder)


FAMILY = Family(
    name="medsa",
    summary="Medical SAM Adapter: bottleneck adapters, SD-Trans depth attention for 3D",
    build=build_medsa,
    options=(CHECKPOINT, BASE, IMAGE_SIZE, DEPTH,
             Option("era", "Med-SA preprocessing era (legacy: [0,1], (y,x) clicks)",
                    choices=("legacy", "2025"))),
    decoder_graph="medsa",
    merge=merge_medsa,
)
