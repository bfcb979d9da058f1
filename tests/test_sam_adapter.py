"""SAM-Adapter: the FFT high-pass as matrix products, the upstream layout, merge, export, runtime.

Checkpoints are synthetic (random weights; TINY ViT at 256, SMALL at 128) in exactly the layout
SAM-Adapter's ``train.py`` saves (``upstream_layouts.sam_adapter_state``). Tolerances: the
DFT-matrix high-pass vs upstream's torch.fft ≤ 1e-12 in float64 and ≤ 2e-5 in float32 (values up
to ~5; measured ~1e-14 and ~2e-6 at 1024²); merged vs upstream model ≤ 1e-4; runtime vs the
upstream (torch.fft) model: embeddings ≤ 5e-4, logits ≤ 1e-4, label maps ≥ 99.9 % identical.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import upstream_layouts as ul  # tests/ is on sys.path (pytest's default rootdir-relative import)
import upstream_pipelines as up
from torch.utils.flop_counter import FlopCounterMode

from samedge.errors import FamilyMismatchError, KeyMismatchError
from samedge.export.exporter import export_bundle
from samedge.models import samed
from samedge.models.highpass import HighPass, cutoff, upstream_highpass
from samedge.models.infer import infer_decoder, infer_encoder
from samedge.models.sam import SAM_VARIANTS
from samedge.models.sam_adapter import (
    PROMPT,
    build_sam_adapter,
    reference_forward,
    sam_adapter_preprocessing,
    sam_adapter_reference,
)
from samedge.runtime import Predictor
from samedge.runtime.transforms import preprocess
from samedge.validation.drift import measure_drift

EMBEDDING_TOL, LOGIT_TOL, LABEL_AGREEMENT = 5e-4, 1e-4, 0.999
BACKENDS = ("onnxruntime", "openvino")


def _by_frequency(x: np.ndarray, rate: float) -> np.ndarray:
    """The high-pass written from its meaning, not upstream's code: zero every (ky, kx) with both
    signed integer frequencies in [-line, line-1] (fftshift puts 0 at index ⌊n/2⌋)."""
    h, w = x.shape[-2:]
    line = cutoff(h, w, rate)
    fy, fx = np.fft.fftfreq(h, 1 / h), np.fft.fftfreq(w, 1 / w)
    box = ((fy >= -line) & (fy < line))[:, None] & ((fx >= -line) & (fx < line))[None, :]
    return np.abs(np.fft.ifft2(np.fft.fft2(x) * ~box).real)


@pytest.fixture(scope="module")
def slices_1024(real_slices):
    """Real slices as SAM-Adapter feeds them at its trained size (PIL bilinear, ImageNet norm)."""
    pre = sam_adapter_preprocessing(1024, 256)
    chosen = [s for s in real_slices if s.name in ("CT_small.dcm", "examples_overlay.dcm")]
    return [torch.from_numpy(preprocess(s.image, pre)[0]) for s in chosen]


# -- the FFT high-pass as matrix products ---------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 16), (15, 15), (12, 20), (9, 14), (128, 128)])
def test_upstream_box_removes_frequencies_minus_line_to_line_minus_one(shape):
    x = torch.randn(2, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(upstream_highpass(x, 0.25).numpy(), _by_frequency(x.numpy(), 0.25),
                               atol=1e-12, rtol=0)


def test_dft_matrices_equal_upstream_fft_on_real_slices(slices_1024):
    """At 1024² (every released config): float64 to round-off, float32 within 2e-5."""
    exact, single = HighPass(1024, 1024, 0.25, torch.float64), HighPass(1024, 1024, 0.25)
    assert exact.line == 256 and exact.ranks == (2, 2)
    for image in slices_1024:
        want = upstream_highpass(image.double(), 0.25)
        assert float(want.abs().max()) > 0.3  # edges pass the filter (slices are upsampled)
        assert float((exact(image.double()) - want).abs().max()) <= 1e-12
        assert float((single(image) - want).abs().max()) <= 2e-5


@pytest.mark.parametrize("shape", [(16, 16), (15, 15), (12, 20), (5, 7), (6, 6)])
@pytest.mark.parametrize("rate", [0.05, 0.25, 1.0, 2.0])
def test_dft_matrices_follow_upstream_where_the_box_wraps_or_vanishes(shape, rate):
    """Large rates slice from negative starts (Python wraps them), tiny ones remove nothing."""
    x = torch.randn(1, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = HighPass(*shape, rate, torch.float64)(x)
    assert float((got - upstream_highpass(x, rate)).abs().max()) <= 1e-12


@pytest.mark.parametrize("n", [15, 16, 1024])
def test_imaginary_part_is_the_unpaired_frequency(n):
    """B = Im L = -sin(2π·line·(r-c)/n)/n: rank 2, the -line term that has no +line partner."""
    hp = HighPass(n, n, 0.25, torch.float64)
    d = np.subtract.outer(np.arange(n), np.arange(n))
    expected = -np.sin(2 * np.pi * hp.line * d / n) / n
    np.testing.assert_allclose((hp.u_h @ hp.vt_h).numpy(), expected, atol=1e-13)
    assert hp.ranks == (2, 2)


def test_stated_flops_are_what_torch_counts():
    hp = HighPass(1024, 1024, 0.25)
    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        hp.to("meta")(torch.empty(1, 3, 1024, 1024))
    elementwise = 3 * 3 * 1024 * 1024  # two subtractions and abs: not matmuls, not counted
    assert counter.get_total_flops() == hp.flops() - elementwise
    assert 12.8e9 < hp.flops() < 12.95e9


# -- loading the upstream layout ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_card(tiny_checkpoints):
    return build_sam_adapter(tiny_checkpoints["sam_adapter"])


def test_checkpoint_loads_strictly_where_upstream_puts_it(tiny_checkpoints, tiny_card):
    state = torch.load(tiny_checkpoints["sam_adapter"], weights_only=True)
    ref = tiny_card.reference
    assert set(ref.state_dict()) == set(state)  # test.py loads with strict=True
    generator = ref.image_encoder.prompt_generator
    assert torch.equal(generator.lightweight_mlp_3[0].weight, state[PROMPT + "lightweight_mlp_3.0.weight"])
    assert torch.equal(generator.prompt_generator.proj.weight, state[PROMPT + "prompt_generator.proj.weight"])
    assert torch.equal(ref.pe_layer.positional_encoding_gaussian_matrix,
                       state["pe_layer.positional_encoding_gaussian_matrix"])
    desc = tiny_card.describe()
    assert (desc["image_size"], desc["variant"], desc["decoder"], desc["prompt"]) == \
        (256, "custom", "semantic", "none")  # the size is read from the file
    assert desc["checkpoint"]["prompt_width"] == 2  # 64 / scale_factor 32


@pytest.mark.parametrize("variant, keys", [("vit_b", 329), ("vit_l", 521), ("vit_h", 649)])
def test_released_vit_configs_load_shape_for_shape(variant, keys):
    """cod-sam-vit-{b,l,h}.yaml at 1024²: the loader's model has exactly the file's tensors."""
    config = replace(SAM_VARIANTS[variant], prompt_dim=256)
    with torch.device("meta"):
        layout = ul.sam_adapter_state(config, mlp_dim=2048, iou_hidden=256)
        inferred = infer_encoder(layout, what="layout")
        hidden = layout[PROMPT + "embedding_generator.weight"].shape[0]
        model = sam_adapter_reference(inferred, infer_decoder(layout, "layout"), hidden)
    assert inferred == replace(config, prompt_dim=256)
    assert len(layout) == keys and hidden == config.embed_dim // 32
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in layout.items()}


def test_loader_errors_name_the_problem(tiny_checkpoints, tmp_path):
    with pytest.raises(FamilyMismatchError, match="not a SAM-Adapter model.*SAMed LoRA"):
        build_sam_adapter(tiny_checkpoints["samed"])
    state = torch.load(tiny_checkpoints["sam_adapter"], weights_only=True)
    del state[PROMPT + "lightweight_mlp_3.0.weight"], state[PROMPT + "lightweight_mlp_3.0.bias"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(KeyMismatchError, match="lightweight_mlp_3.0"):
        build_sam_adapter(tmp_path / "cut.pth")
    with pytest.raises(FamilyMismatchError, match="SAM-Adapter"):
        samed.build_samed(tiny_checkpoints["base"], tiny_checkpoints["sam_adapter"])


# -- merged == upstream ---------------------------------------------------------------------------
def test_merged_equals_upstream_and_both_prompts_matter(tiny_checkpoints):
    card = build_sam_adapter(tiny_checkpoints["sam_adapter"])
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    ref, merged = reference_forward(card, images), reference_forward(card.model, images)
    for key in ("embeddings", "low_res_logits", "iou_predictions", "masks"):
        assert float((ref[key] - merged[key]).abs().max()) <= 1e-4, key
    assert ref["low_res_logits"].shape == (2, 2, 64, 64) and not ref["low_res_logits"][:, 0].any()
    generator = card.reference.image_encoder.prompt_generator
    for part in (generator.prompt_generator.proj, generator.embedding_generator):
        with torch.no_grad():
            saved = part.weight.clone()
            part.weight.zero_()
            changed = reference_forward(card.model, images)["embeddings"]
            part.weight.copy_(saved)
        assert float((changed - merged["embeddings"]).abs().max()) > 1e-2


def test_merged_encoder_exports_as_matmul_where_upstream_cannot(tiny_card):
    example = torch.rand(1, 3, 256, 256)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(tiny_card.model.image_encoder.eval(), (example,), buf, dynamo=False,
                          opset_version=17)
    graph = onnx.load_from_string(buf.getvalue()).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"DFT", "Einsum", "ScatterND", "Loop", "If"}, ops
    constants = {init.name for init in graph.initializer}
    highpass = [n for n in graph.node if n.op_type == "MatMul" and "highpass" in n.name]
    assert len(highpass) == 6 and all(set(n.input) & constants for n in highpass)
    with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="fft_fft2"):
        torch.onnx.export(tiny_card.reference.image_encoder, (example,), io.BytesIO(),
                          dynamo=False, opset_version=17)


# -- export and runtime vs the upstream (torch.fft) model -----------------------------------------
@pytest.fixture(scope="module")
def small_card(small_checkpoints):
    return build_sam_adapter(small_checkpoints["sam_adapter"])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, small_card, real_slices):
    chosen = [s for s in real_slices if s.name in ("CT_small.dcm", "examples_overlay.dcm")]
    out = tmp_path_factory.mktemp("sam_adapter") / "bundle"
    return out, export_bundle(small_card, out, [s.image for s in chosen], backends=BACKENDS,
                              image_names=[s.name for s in chosen])


def test_manifest_declares_the_binary_decoder(bundle):
    _, manifest = bundle
    assert manifest["model"]["family"] == "sam_adapter" and manifest["model"]["decoder"] == "semantic"
    decoder = manifest["graphs"]["decoder"]
    assert decoder["variant"] == "binary"
    assert [o["shape"] for o in decoder["outputs"]] == [["images", 2, 32, 32], ["images", 1]]
    assert decoder["measured"]["max_abs_error"]["class_logits"] <= LOGIT_TOL
    assert manifest["graphs"]["encoder"]["measured"]["max_abs_error"]["image_embeddings"] <= EMBEDDING_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_equals_upstream_on_real_slices(bundle, small_card, real_slices, backend):
    predictor = Predictor(bundle[0], backend=backend, threads=2)
    for item in real_slices:
        predictor.set_image(item.image)
        result = predictor.segment()
        tensor, frame = preprocess(item.image, small_card.preprocessing)
        ref = reference_forward(small_card, torch.from_numpy(tensor))
        assert float(np.abs(predictor.embeddings - ref["embeddings"].numpy()).max()) <= EMBEDDING_TOL
        error = float(np.abs(result.low_res_logits - ref["low_res_logits"].numpy()).max())
        assert error <= LOGIT_TOL
        probability = torch.sigmoid(F.interpolate(ref["masks"], frame.original_hw, mode="bilinear",
                                                  align_corners=False))[:, 0].numpy()
        want = probability > 0.5  # test.py: sigmoid, then its metrics' 0.5 threshold
        assert result.labels.shape == (1, *item.image.shape[:2])
        up.assert_agree_where_decided(result.labels, want, up.decision_margin(probability, 0.5),
                                      up.graph_bound(error))
        assert np.unique(want).size == 2, item.name  # the maps are not trivially uniform


def test_card_records_upstreams_val_transform(small_card):
    """datasets/wrappers.py's ValDataset, held against torchvision in test_upstream_preprocessing."""
    assert small_card.preprocessing == sam_adapter_preprocessing(128, 32)


def test_semantic_drift_reads_the_binary_label_maps(bundle, small_card, real_slices):
    variants = [("onnxruntime", "fp32"), ("openvino", "fp16")]
    drift = measure_drift(small_card, bundle[0], real_slices[:3], variants, threads=2)
    fp32, fp16 = (drift[v].summary() for v in variants)
    assert fp32["pixel_agreement_min"] >= LABEL_AGREEMENT and set(fp32["class_dice_mean"]) == {0, 1}
    assert fp32["logits_max_abs"] <= LOGIT_TOL
    assert fp16["pixel_agreement_mean"] >= 0.99  # FP16 weights, the DFT matrices included
