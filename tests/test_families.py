"""SAMed, Med-SA and MA-SAM: upstream layouts load exactly, merged == unmerged, exportable graphs.

Checkpoints are synthetic (random weights, tiny ViT) but written in each project's exact layout by
``upstream_layouts``. Merge tolerance: max |merged − reference| ≤ 1e-4 on embeddings and logits
(measured ~1e-6 … 4e-6 on these sizes).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import upstream_layouts as ul  # tests/ is on sys.path (pytest's default rootdir-relative import)

from samedge.errors import CheckpointError, FamilyMismatchError, KeyMismatchError
from samedge.models import masam, medsa, medsa_blocks, samed
from samedge.models.registry import FAMILY_NAMES
from samedge.models.sam import SAM_PIXEL_MEAN, SAM_VARIANTS
from samedge.models.vit_blocks import AdapterBlock, Encoder, SliceAdapterBlock

TOL = 1e-4


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _onnx_ops(module: torch.nn.Module, example: torch.Tensor) -> tuple[set[str], list[str]]:
    """Op types of the legacy-exported graph, and the tracer's data-dependence warnings."""
    import onnx

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(module.eval(), (example,), buf, dynamo=False, opset_version=17)
    traced = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    return {node.op_type for node in onnx.load_from_string(buf.getvalue()).graph.node}, traced


@pytest.fixture(scope="module")
def files(tiny_checkpoints):
    return tiny_checkpoints


@pytest.fixture(scope="module")
def samed_card(files):
    return samed.build_samed(files["base"], files["samed"], image_size=128)


@pytest.fixture(scope="module")
def masam_card(files):
    return masam.build_masam(files["base"], files["masam"], depth=5, image_size=128, scale=0.5)


# -- upstream quirks ------------------------------------------------------------------------------
def test_closest_numbers_reproduces_med_sa():
    assert medsa_blocks.closest_numbers(96) == (8, 12)
    assert medsa_blocks.closest_numbers(6) == (2, 3)
    assert medsa_blocks.closest_numbers(7) == (1, 7)
    assert medsa_blocks.closest_numbers(4) == (1, 4)  # the search never yields (a, a)
    with pytest.raises(ValueError):
        medsa_blocks.closest_numbers(1)  # upstream loops forever


def test_samed_substring_rule_picks_by_digit_not_by_block():
    keys = [f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in range(24) for a in "hw"]
    picked = {int(k.split(".")[2]) for k in samed.global_rel_pos_keys(keys, "substring", ())}
    assert picked == {2, 5, 8, 11, 12, 15, 18, 20, 21, 22, 23}  # ViT-L: 17 missed, 12/15/... caught
    vit_b = [k for k in keys if int(k.split(".")[2]) < 12]
    assert {int(k.split(".")[2]) for k in samed.global_rel_pos_keys(vit_b, "substring", ())} == {2, 5, 8, 11}
    by_index = samed.global_rel_pos_keys(keys, "index", (5, 11, 17, 23))
    assert {int(k.split(".")[2]) for k in by_index} == {5, 11, 17, 23}


def test_layout_helpers_match_verified_upstream_key_counts():
    """The synthetic layouts have the key counts the reference verified on ViT-B."""
    vit_b = replace(SAM_VARIANTS["vit_b"], prompt_dim=256)
    dec = dict(mlp_dim=2048, iou_hidden=256)
    with torch.device("meta"):
        assert len(ul.samed_file(vit_b, image_size=512, num_classes=8, **dec)) == 215
        assert len(ul.samed_file(vit_b, image_size=512, num_classes=8, decoder_lora=True, **dec)) == 161
        assert len(ul.masam_file(vit_b, image_size=512, rank=32, num_classes=12, **dec)) == 369
        assert len(ul.medsa_state(vit_b, **dec)) == 458  # whole Sam + 3 adapters × 4 × 12


def test_registry_lists_the_families():
    assert {"samed", "medsa", "masam"} <= set(FAMILY_NAMES)


# -- SAMed ----------------------------------------------------------------------------------------
def test_samed_tensors_land_where_upstream_puts_them(files, samed_card):
    lora, base = torch.load(files["samed"]), torch.load(files["base"])
    ref = samed_card.reference
    enc = ref.image_encoder
    assert torch.equal(enc.blocks[1].attn.qkv.linear_a_v.weight, lora["w_a_003"])
    assert torch.equal(enc.blocks[3].attn.qkv.linear_b_q.weight, lora["w_b_006"])
    assert torch.equal(ref.mask_decoder.mask_tokens.weight, lora["mask_decoder.mask_tokens.weight"])
    assert torch.equal(ref.prompt_encoder.point_embeddings[1].weight, lora["prompt_encoder.point_embeddings.1.weight"])
    assert torch.equal(enc.blocks[0].attn.qkv.qkv.weight, base["image_encoder.blocks.0.attn.qkv.weight"])
    # SAMed's load_from resizes: pos_embed bilinear to S/16, global rel-pos as a 1×1×L×hd image
    pos = F.interpolate(base["image_encoder.pos_embed"].permute(0, 3, 1, 2), (8, 8), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(enc.pos_embed, pos)
    rel = F.interpolate(base["image_encoder.blocks.2.attn.rel_pos_h"][None, None], (15, 32),
                        mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(enc.blocks[2].attn.rel_pos_h, rel)
    assert torch.equal(enc.blocks[1].attn.rel_pos_h, base["image_encoder.blocks.1.attn.rel_pos_h"])
    # merged qkv: W[0:C] += B_q A_q, W[2C:3C] += B_v A_v, k rows and bias untouched
    merged = samed_card.model.image_encoder.blocks[1].attn.qkv
    w = base["image_encoder.blocks.1.attn.qkv.weight"].double()
    c = 64
    assert torch.allclose(merged.weight[:c].double(), w[:c] + lora["w_b_002"].double() @ lora["w_a_002"].double(), atol=1e-6)
    assert torch.equal(merged.weight[c:2 * c], base["image_encoder.blocks.1.attn.qkv.weight"][c:2 * c])
    assert torch.allclose(merged.weight[2 * c:].double(), w[2 * c:] + lora["w_b_003"].double() @ lora["w_a_003"].double(), atol=1e-6)
    assert torch.equal(merged.bias, base["image_encoder.blocks.1.attn.qkv.bias"])


def test_samed_merged_equals_reference_and_lora_matters(samed_card):
    card = samed_card
    assert card.family == "samed" and card.decoder == "semantic" and card.variant == "samed"
    assert card.num_mask_tokens == 4 and card.embedding_shape == (64, 8, 8)
    assert isinstance(card.model.image_encoder, Encoder)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    ref = samed.reference_forward(card, images)
    merged = samed.reference_forward(card.model, images)
    assert ref["low_res_logits"].shape == (2, 4, 32, 32) and ref["masks"].shape == (2, 4, 128, 128)
    diffs = _max_diff(ref, merged)
    assert max(diffs.values()) <= TOL, diffs
    without = samed.semantic_forward(card.reference, images)  # sanity: the LoRA changes outputs
    saved = [blk.attn.qkv.linear_b_q.weight.detach().clone() for blk in card.reference.image_encoder.blocks]
    try:
        for blk in card.reference.image_encoder.blocks:
            blk.attn.qkv.linear_b_q.weight.data.zero_()
        without = samed.semantic_forward(card.reference, images)
    finally:
        for blk, w in zip(card.reference.image_encoder.blocks, saved):
            blk.attn.qkv.linear_b_q.weight.data.copy_(w)
    assert float((without["embeddings"] - ref["embeddings"]).abs().max()) > 100 * TOL


def test_samed_s_folds_decoder_lora(files):
    card = samed.build_samed(files["base"], files["samed_s"], image_size=128)
    assert card.variant == "samed_s"
    lora, base = torch.load(files["samed_s"]), torch.load(files["base"])
    attn = card.reference.mask_decoder.transformer.layers[1].cross_attn_image_to_token
    assert torch.equal(attn.v_proj.w_a.weight, lora["cit_a_003"])
    assert torch.equal(attn.v_proj.proj.weight,
                       base["mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.weight"])
    folded = card.model.mask_decoder.transformer.final_attn_token_to_image.q_proj
    assert isinstance(folded, torch.nn.Linear) and type(folded) is torch.nn.Linear
    expected = base["mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"].double() + \
        lora["fati_qb"].double() @ lora["fati_qa"].double()
    assert torch.allclose(folded.weight.double(), expected, atol=1e-6)
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    diffs = _max_diff(samed.reference_forward(card, images), samed.reference_forward(card.model, images))
    assert max(diffs.values()) <= TOL, diffs


def test_samed_substring_quirk_breaks_where_upstream_breaks(tmp_path):
    config = replace(ul.TINY, global_attn_indexes=(1, 3))  # digits the SAMed rule does not catch
    base = _save(ul.sam_base(config), tmp_path / "base.pth")
    lora = _save(ul.samed_file(config), tmp_path / "lora.pth")
    with pytest.raises(KeyMismatchError, match="substring.*rel_pos"):
        samed.build_samed(base, lora, image_size=128)
    card = samed.build_samed(base, lora, image_size=128, variant="samed_h")  # SAMed_h: by index
    assert card.checkpoint["global_rel_pos_rule"] == "index"
    assert card.reference.image_encoder.blocks[1].attn.rel_pos_h.shape == (15, 32)
    card = samed.build_samed(base, lora, image_size=256)  # no resize at the base size
    assert card.reference.image_encoder.blocks[1].attn.rel_pos_h.shape == (31, 32)


def test_samed_errors_name_the_problem(files, tmp_path):
    with pytest.raises(FamilyMismatchError, match="MA-SAM"):
        samed.build_samed(files["base"], files["masam"], image_size=128)
    with pytest.raises(FamilyMismatchError, match="Med-SA"):
        samed.build_samed(files["base"], files["medsa"], image_size=128)
    with pytest.raises(FamilyMismatchError, match="not a SAM checkpoint.*SAMed"):
        samed.build_samed(files["samed"], files["samed"], image_size=128)
    wide = _save(ul.sam_base(replace(ul.TINY, embed_dim=96, num_heads=3)), tmp_path / "vit_wide.pth")
    with pytest.raises(FamilyMismatchError, match=r"w_a_000 \(4, 64\).*width 96"):
        samed.build_samed(wide, files["samed"], image_size=128)
    with pytest.raises(KeyMismatchError, match="mask_tokens.*num_classes=8"):
        samed.build_samed(files["base"], files["samed"], image_size=128, num_classes=8)
    with pytest.raises(KeyMismatchError, match="rank 4"):
        samed.build_samed(files["base"], files["samed"], image_size=128, rank=8)
    data = files["samed"].read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        samed.build_samed(files["base"], truncated, image_size=128)
    partial = {k: v for k, v in torch.load(files["samed"]).items() if k != "w_b_005"}
    with pytest.raises(KeyMismatchError, match="incomplete"):
        samed.build_samed(files["base"], _save(partial, tmp_path / "partial.pth"), image_size=128)


def test_samed_preprocessing_is_unnormalised_ct_window(samed_card):
    pre = samed_card.preprocessing
    assert (pre.image_size, pre.resize, pre.normalize, pre.ct_window) == (128, "stretch", "unit", (75.0, 400.0))
    assert pre.pixel_mean == (0.0, 0.0, 0.0) and pre.mask_size == 32


# -- MA-SAM ---------------------------------------------------------------------------------------
def test_masam_tensors_land_and_fact_folds(files, masam_card):
    state, base = torch.load(files["masam"]), torch.load(files["base"])
    fact = masam_card.reference.image_encoder
    blk = fact.ImageEncoderViT.blocks[3].Block
    p = "image_encoder.ImageEncoderViT.blocks.3.Block."
    assert torch.equal(blk.adapter_conv_2.weight, state[p + "adapter_conv_2.weight"])
    assert torch.equal(blk.adapter_linear_down.weight, state[p + "adapter_linear_down.weight"])
    assert torch.equal(blk.attn.Attention.qkv.v_FacTs.weight, state["v_FacTs_003"])
    assert torch.equal(fact.FacTu.weight, state["image_encoder.FacTu.weight"])
    assert torch.equal(masam_card.reference.mask_decoder.output_upscaling[9].weight,
                       state["mask_decoder.output_upscaling.9.weight"])
    rel = F.interpolate(base["image_encoder.blocks.2.attn.rel_pos_w"][None, None], (15, 32),
                        mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(fact.ImageEncoderViT.blocks[2].Block.attn.Attention.rel_pos_w, rel)
    u, v = state["image_encoder.FacTu.weight"].double(), state["image_encoder.FacTv.weight"].double()
    w = base["image_encoder.blocks.3.attn.qkv.weight"].double()
    merged = masam_card.model.image_encoder.blocks[3].attn.qkv.weight.double()
    assert torch.allclose(merged[:64], w[:64] + 0.5 * v @ state["q_FacTs_003"].double() @ u, atol=1e-6)
    assert torch.allclose(merged[128:], w[128:] + 0.5 * v @ state["v_FacTs_003"].double() @ u, atol=1e-6)


def test_masam_merged_equals_reference_full_resolution(masam_card):
    card = masam_card
    assert card.depth == 5 and card.decoder == "semantic" and card.num_mask_tokens == 5
    assert isinstance(card.model.image_encoder.blocks[0], SliceAdapterBlock)
    images = torch.rand(5, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    ref = masam.reference_forward(card, images)
    assert ref["low_res_logits"].shape == (5, 5, 128, 128)  # 4-stage upscaler: full resolution
    diffs = _max_diff(ref, masam.reference_forward(card.model, images))
    assert max(diffs.values()) <= TOL, diffs
    assert card.preprocessing.ct_window == (25.0, 450.0) and card.preprocessing.mask_size == 128


def test_masam_slices_interact_only_through_the_adapters(masam_card):
    """Changing one slice changes the others' embeddings (Conv3d over D), as MA-SAM intends."""
    images = torch.rand(5, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    other = images.clone()
    other[0] = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = masam_card.model.image_encoder(images), masam_card.model.image_encoder(other)
    assert float((a[4] - b[4]).abs().max()) > 1e-4


def test_masam_errors(files, tmp_path):
    with pytest.raises(FamilyMismatchError, match="SAMed LoRA"):
        masam.build_masam(files["base"], files["samed"], image_size=128)
    wide = _save(ul.sam_base(replace(ul.TINY, embed_dim=96, num_heads=3)), tmp_path / "vit_wide.pth")
    with pytest.raises(FamilyMismatchError, match=r"FacTu.weight \(8, 64\).*width 96"):
        masam.build_masam(wide, files["masam"], image_size=128)
    with pytest.raises(KeyMismatchError, match="num_classes=12"):
        masam.build_masam(files["base"], files["masam"], image_size=128, num_classes=12)


# -- Med-SA ---------------------------------------------------------------------------------------
def _medsa_forward(card_or_model, n: int, size: int = 256, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=gen)
    points = torch.rand(n, 1, 2, generator=gen) * size
    return medsa.reference_forward(card_or_model, images, points, torch.ones(n, 1))


def test_medsa_wrapper_loads_whole_sam_exactly(files):
    card = medsa.build_medsa(files["medsa"])
    state = torch.load(files["medsa"])["state_dict"]
    ref_state = card.reference.state_dict()
    assert set(ref_state) == set(state)  # the exact upstream key set, strict
    assert all(torch.equal(ref_state[k], state[k]) for k in state)
    assert card.reference.image_encoder.blocks[0].attn.rel_names == ("rel_h", "rel_w")
    assert card.image_size == 256 and card.depth == 1  # from the global rel_h length 31


def test_medsa_2d_merged_equals_reference_and_quirks(files):
    card = medsa.build_medsa(files["medsa"])
    assert card.prompt == "points" and not card.multimask_default and card.num_mask_tokens == 4
    enc = card.model.image_encoder
    assert all(not blk.attn.grids for blk in enc.blocks)  # zero rel_h/rel_w dropped
    pos = F.interpolate(card.reference.image_encoder.pos_embed.permute(0, 3, 1, 2), (16, 16),
                        mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(enc.pos_embed, pos)  # bicubic resize baked once
    ref, merged = _medsa_forward(card, 2), _medsa_forward(card.model, 2)
    assert ref["low_res_logits"].shape == (2, 1, 64, 64)  # token 0 of max(4, 1)
    diffs = _max_diff(ref, merged)
    assert max(diffs.values()) <= TOL, diffs
    pre = card.preprocessing
    assert (pre.resize, pre.normalize, pre.point_order) == ("stretch", "unit", "yx")


def test_medsa_rel_pos_era_and_sam_decoder(tmp_path):
    state = ul.medsa_state(rel="rel_pos", rel_values="random", decoder_style="sam")
    path = _save(ul.medsa_checkpoint(state), tmp_path / "checkpoint_best.pth")
    card = medsa.build_medsa(path, era="2025")
    assert card.model.image_encoder.blocks[2].attn.grids == [(16, 16)]
    assert card.model.image_encoder.blocks[0].attn.grids == [(14, 14)]
    diffs = _max_diff(_medsa_forward(card, 2), _medsa_forward(card.model, 2))
    assert max(diffs.values()) <= TOL, diffs
    pre = card.preprocessing
    assert pre.normalize == "mean_std" and pre.pixel_mean == SAM_PIXEL_MEAN and pre.point_order == "xy"


def test_medsa_decoder_transformers_differ(tmp_path):
    """Med-SA's EfficientSAM-style decoder is a different function of the same weights."""
    sam_style = _save(ul.medsa_checkpoint(ul.medsa_state(decoder_style="sam")), tmp_path / "a.pth")
    eff_style = _save(ul.medsa_checkpoint(ul.medsa_state(decoder_style="medsa")), tmp_path / "b.pth")
    a, b = _medsa_forward(medsa.build_medsa(sam_style), 1), _medsa_forward(medsa.build_medsa(eff_style), 1)
    assert torch.equal(a["embeddings"], b["embeddings"])
    assert float((a["low_res_logits"] - b["low_res_logits"]).abs().max()) > 1e-3


def test_medsa_without_rel_pos_needs_image_size(tmp_path):
    path = _save(ul.medsa_checkpoint(ul.medsa_state(rel=None)), tmp_path / "norel.pth")
    with pytest.raises(CheckpointError, match="image_size="):
        medsa.build_medsa(path, num_heads=2, global_attn_indexes=(2,))
    card = medsa.build_medsa(path, image_size=256, num_heads=2, global_attn_indexes=(2,))
    assert card.reference.image_encoder.blocks[0].attn.rel_names is None
    with pytest.raises(CheckpointError, match="num_heads="):
        medsa.build_medsa(path, image_size=256)


def test_medsa_lora_merges_qkv_and_mlp(tmp_path):
    state = ul.medsa_state(mode="lora", rel_values="random")
    path = _save(ul.medsa_checkpoint(state), tmp_path / "lora.pth")
    with pytest.raises(CheckpointError, match="image_size="):
        medsa.build_medsa(path)  # global rel-pos stays 127 long at any size
    card = medsa.build_medsa(path, image_size=256)
    p = "image_encoder.blocks.1."
    a, b = state[p + "attn.qkv.lora_A"].double(), state[p + "attn.qkv.lora_B"].double()
    w = state[p + "attn.qkv.weight"].double()
    merged = card.model.image_encoder.blocks[1].attn.qkv.weight.double()
    assert torch.allclose(merged[:64], w[:64] + b[:64] @ a[:4] / 4, atol=1e-6)
    assert torch.allclose(merged[64:128], w[64:128], atol=0)
    assert torch.allclose(merged[128:], w[128:] + b[64:] @ a[4:] / 4, atol=1e-6)
    lin2 = card.model.image_encoder.blocks[1].mlp.lin2
    expected = state[p + "mlp.lin2.weight"].double() + state[p + "mlp.lin2.lora_B"].double() @ state[p + "mlp.lin2.lora_A"].double() / 4
    assert type(lin2) is torch.nn.Linear and torch.allclose(lin2.weight.double(), expected, atol=1e-6)
    diffs = _max_diff(_medsa_forward(card, 2), _medsa_forward(card.model, 2))
    assert max(diffs.values()) <= TOL, diffs


def test_medsa_3d_regroup_mixes_windows_and_slices_like_upstream():
    """The leading dim of windowed tokens is (slice, window); groups of D consecutive entries."""
    from samedge.models.vit_blocks import DepthRegroup

    depth, windows, c = 6, 4, 3
    x = torch.arange(depth * windows * 2 * 2 * c, dtype=torch.float32).reshape(depth * windows, 2, 2, c)
    regroup = DepthRegroup(depth, medsa_blocks.closest_numbers(depth), (2, 2), c)
    grouped = regroup.to_depth(x)  # (groups·h·w, dh, dw, c)
    for i in range(depth * windows):  # loop form of '(b d) h w c -> (b h w) d c'
        group, d = divmod(i, depth)
        for y in range(2):
            for xx in range(2):
                row = (group * 2 + y) * 2 + xx
                assert torch.equal(grouped[row].reshape(depth, c)[d], x[i, y, xx])
    assert torch.equal(regroup.from_depth(grouped), x)


def test_medsa_3d_merged_equals_reference(files, tmp_path):
    """Non-zero rel-pos, so the depth pass uses tables resized to the 2×3 slice grid."""
    path = _save(ul.medsa_checkpoint(ul.medsa_state(rel="rel_pos", rel_values="random")), tmp_path / "3d.pth")
    card = medsa.build_medsa(path, depth=6)
    blocks = card.model.image_encoder.blocks
    assert all(isinstance(b, AdapterBlock) and b.regroup.grid == (2, 3) for b in blocks)
    assert blocks[0].attn.grids == [(14, 14), (2, 3)] and blocks[2].attn.grids == [(16, 16), (2, 3)]
    assert card.reference.image_encoder.blocks[0].chunk == 6
    ref, merged = _medsa_forward(card, 6), _medsa_forward(card.model, 6)
    diffs = _max_diff(ref, merged)
    assert max(diffs.values()) <= TOL, diffs
    flat = _medsa_forward(medsa.build_medsa(path), 6)  # the depth branch matters
    assert float((flat["embeddings"] - ref["embeddings"]).abs().max()) > 100 * TOL
    pre = card.preprocessing
    assert pre.ct_window == (37.5, 425.0) and pre.point_order == "yx"
    pre_2025 = medsa.build_medsa(files["medsa"], depth=6, era="2025").preprocessing
    assert pre_2025.pixel_mean == tuple(m * 255 for m in SAM_PIXEL_MEAN)  # mean/std on [0, 1] data


def test_medsa_errors(files, tmp_path):
    with pytest.raises(FamilyMismatchError, match="SAMed LoRA"):
        medsa.build_medsa(files["samed"])
    with pytest.raises(FamilyMismatchError, match="SAM ViT"):
        medsa.build_medsa(files["base"])
    with pytest.raises(KeyMismatchError, match="rel_h.*image size 512"):
        medsa.build_medsa(files["medsa"], image_size=512)
    with pytest.raises(KeyMismatchError, match="mask tokens.*max\\(4, 6\\)"):
        medsa.build_medsa(files["medsa"], multimask_output=6)
    many = _save(ul.medsa_checkpoint(ul.medsa_state(outputs=6)), tmp_path / "six.pth")
    card = medsa.build_medsa(many)
    assert card.model.mask_decoder.num_multimask_outputs == 6
    assert _medsa_forward(card.model, 1)["low_res_logits"].shape[1] == 6
    state = torch.load(files["medsa"])
    state["state_dict"]["image_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(96, 64)
    with pytest.raises(FamilyMismatchError, match="qkv.weight: checkpoint \\(96, 64\\)"):
        medsa.build_medsa(_save(state, tmp_path / "bad.pth"))


def test_medsa_base_fills_missing_frozen_tensors(files, tmp_path):
    state = torch.load(files["medsa"])
    del state["state_dict"]["image_encoder.patch_embed.proj.weight"]
    path = _save(state, tmp_path / "adapters_only.pth")
    with pytest.raises(CheckpointError):
        medsa.build_medsa(path)
    card = medsa.build_medsa(path, base=files["base"])
    assert torch.equal(card.reference.image_encoder.patch_embed.proj.weight,
                       torch.load(files["base"])["image_encoder.patch_embed.proj.weight"])


# -- export-friendliness ----------------------------------------------------------------------------
@pytest.mark.slow
def test_merged_encoders_export_without_einsum_or_scatter(files, samed_card, masam_card, tmp_path):
    lora = _save(ul.medsa_checkpoint(ul.medsa_state(mode="lora", rel_values="random")), tmp_path / "l.pth")
    rel3d = _save(ul.medsa_checkpoint(ul.medsa_state(rel="rel_pos", rel_values="random")), tmp_path / "r.pth")
    cases = [
        (samed_card.model.image_encoder, torch.rand(1, 3, 128, 128)),
        (masam_card.model.image_encoder, torch.rand(5, 3, 128, 128)),
        (medsa.build_medsa(rel3d, depth=6).model.image_encoder, torch.rand(6, 3, 256, 256)),
        (medsa.build_medsa(lora, image_size=256).model.image_encoder, torch.rand(1, 3, 256, 256)),
    ]
    for encoder, example in cases:
        ops, traced = _onnx_ops(encoder, example)
        assert not ops & {"Einsum", "ScatterND", "Loop", "If"}, ops
        assert "MatMul" in ops and not traced, traced  # no shape-dependent Python control flow
    # the checks can fail: the unmerged upstream encoder has all three problems
    ops, traced = _onnx_ops(samed_card.reference.image_encoder, torch.rand(1, 3, 128, 128))
    assert {"Einsum", "ScatterND"} <= ops and traced


def test_merged_encoder_onnx_matches_torch(samed_card, tmp_path):
    import onnxruntime as ort

    encoder = samed_card.model.image_encoder.eval()
    example = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(6))
    path = tmp_path / "encoder.onnx"
    with torch.no_grad():
        torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["embeddings"])
        expected = samed.reference_forward(samed_card, example)["embeddings"].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": example.numpy()})[0]
    assert abs(got - expected).max() <= TOL


def test_cards_describe_for_the_manifest(samed_card, masam_card):
    for card in (samed_card, masam_card):
        desc = card.describe()
        assert desc["decoder"] == "semantic" and desc["prompt"] == "none"
        assert re.fullmatch(r"[0-9a-f]{64}", desc["checkpoint"]["sha256"])
        assert "reference" not in desc
    assert masam_card.describe()["depth"] == 5
