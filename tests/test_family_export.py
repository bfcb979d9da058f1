"""SAMed, Med-SA (2D and 3D) and MA-SAM end to end: upstream-format checkpoint → bundle → runtime.

The checkpoints are synthetic (random weights, a 3-block ViT of width 64) in exactly each upstream
layout (``upstream_layouts``). The runtime (ONNX Runtime and OpenVINO) is compared with the
*unmerged*, upstream-faithful PyTorch model on real slices (bundled CT/MR) and, for the depth
models, on real stacks of adjacent MR slices: ≤ 5e-4 abs on embeddings, ≤ 1e-4 abs on logits
(measured ~5e-6 and ~1e-6), label maps ≥ 99.9 % identical to PyTorch's argmax.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
import upstream_layouts as ul  # tests/ is on sys.path (pytest's default rootdir-relative import)
import upstream_pipelines as up

from samedge.data import windows
from samedge.data.bundled import bundled_stacks
from samedge.errors import ImageError, PromptError, StackDepthError
from samedge.export.exporter import export_bundle
from samedge.models import build_model, masam, medsa, samed
from samedge.runtime import Predictor, transforms
from samedge.runtime.postprocess import mask_scores
from samedge.runtime.transforms import (
    ImageFrame,
    preprocess,
    preprocess_stack,
    resized_shape,
)
from samedge.validation.drift import measure_drift

pytestmark = pytest.mark.slow  # every test here exports models

EMBEDDING_TOL, LOGIT_TOL, LABEL_AGREEMENT = 5e-4, 1e-4, 0.999
SMALL = ul.SMALL
BACKENDS = ("onnxruntime", "openvino")
MEDSA_3D_DEPTH, MASAM_DEPTH = 4, 5


@pytest.fixture(scope="module")
def cards(small_checkpoints):
    """Each family built from its upstream file through the registry, as ``samedge export``
    does (Med-SA 2D: zero ``rel_h`` era, legacy clicks; 3D: ``rel_pos`` era, real tables)."""
    paths = small_checkpoints
    return {
        "samed": build_model("samed", base=paths["base"], checkpoint=paths["samed"],
                             image_size=128),
        "masam": build_model("masam", base=paths["base"], checkpoint=paths["masam"], image_size=128,
                             depth=MASAM_DEPTH),
        "medsa": build_model("medsa", checkpoint=paths["medsa"]),
        "medsa3d": build_model("medsa", checkpoint=paths["medsa3d"], depth=MEDSA_3D_DEPTH),
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, cards, real_slices):
    chosen = [s for s in real_slices if s.name in ("CT_small.dcm", "examples_overlay.dcm")]
    out = tmp_path_factory.mktemp("family_bundles")
    for name, card in cards.items():  # Meta's SAM interface (the spine's) once, on Med-SA 2D
        export_bundle(card, out / name, [s.image for s in chosen], backends=BACKENDS,
                      image_names=[s.name for s in chosen], sam_interface=name == "medsa")
    return {name: out / name for name in cards}


def _worst(got: np.ndarray, want: torch.Tensor) -> float:
    assert got.shape == tuple(want.shape)
    return float(np.abs(got - want.numpy()).max())


def _assert_labels_are_upstreams(card, got: np.ndarray, ref: dict, logit_error: float,
                                 size: tuple[int, int]) -> None:
    """The label map at the original size as the family's test script derives it from the
    reference's logits: equal on every pixel the graphs' measured difference cannot flip."""
    masks = ref["masks"]
    if card.family == "samed":
        want, margin = up.samed_labels(masks, *size), up.samed_margin(masks, *size)
    else:
        want, margin = up.masam_labels(masks, *size), up.masam_margin(masks, *size)
    up.assert_agree_where_decided(got, want, margin, up.graph_bound(logit_error))
    assert np.unique(want).size > 1  # the maps are not trivially uniform


# -- the graphs -----------------------------------------------------------------------------------
def test_merged_graphs_hold_no_lora_or_fact_structure(bundles):
    for name, path in bundles.items():
        for graph in ("encoder.onnx", "decoder.onnx"):
            ops = {node.op_type for node in onnx.load(str(path / graph)).graph.node}
            assert not ops & {"ScatterND", "Einsum"}, (name, graph, ops)
    ops = {node.op_type for node in onnx.load(str(bundles["masam"] / "encoder.onnx")).graph.node}
    assert "Conv" in ops  # MA-SAM's slice adapters stay as Conv3d; only the linear part folds


def test_manifests_declare_depth_and_decoder_variants(bundles):
    manifest = {n: json.loads((p / "manifest.json").read_text()) for n, p in bundles.items()}
    encoder = manifest["masam"]["graphs"]["encoder"]
    assert encoder["inputs"][0]["shape"] == [MASAM_DEPTH, 3, 128, 128]  # static D
    assert encoder["tolerance"]["image_embeddings"] == {"atol": 5e-4, "rtol": 0.0}
    decoder = manifest["masam"]["graphs"]["decoder"]
    assert decoder["variant"] == "semantic"
    assert [o["shape"] for o in decoder["outputs"]] == [["images", 5, 128, 128], ["images", 5]]
    assert manifest["samed"]["graphs"]["decoder"]["outputs"][0]["shape"] == ["images", 4, 32, 32]
    assert "decoder_sam" not in manifest["samed"]["graphs"]
    for name in ("medsa", "medsa3d"):
        decoder = manifest[name]["graphs"]["decoder"]
        assert decoder["token_selection"] == "graph"
        assert decoder["outputs"][0]["shape"] == ["prompts", 1, 64, 64]  # token 0 of max(4, 1)
    assert manifest["medsa3d"]["graphs"]["encoder"]["inputs"][0]["shape"][0] == MEDSA_3D_DEPTH
    assert len(manifest["masam"]["validation_inputs"]) == 2  # two stacks of adjacent slices
    assert all(len(stack) == MASAM_DEPTH for stack in manifest["masam"]["validation_inputs"])


# -- runtime == unmerged upstream model ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_samed_runtime_equals_upstream_on_real_slices(bundles, cards, real_slices, backend):
    card, predictor = cards["samed"], Predictor(bundles["samed"], backend=backend, threads=2)
    for item in real_slices:
        predictor.set_image(item.image)
        result = predictor.segment()
        tensor, frame = preprocess(item.image, card.preprocessing)
        ref = samed.reference_forward(card, torch.from_numpy(tensor))
        assert _worst(predictor.embeddings, ref["embeddings"]) <= EMBEDDING_TOL, item.name
        error = _worst(result.low_res_logits, ref["low_res_logits"])
        assert error <= LOGIT_TOL, item.name
        assert result.labels.shape == (1, *item.image.shape[:2])
        _assert_labels_are_upstreams(card, result.labels, ref, error, frame.original_hw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masam_runtime_equals_upstream_on_real_stacks(bundles, cards, backend):
    card, predictor = cards["masam"], Predictor(bundles["masam"], backend=backend, threads=2)
    for stack in bundled_stacks(MASAM_DEPTH, count=3):
        images = [s.image for s in stack]
        predictor.set_volume(images)
        result = predictor.segment()
        tensor, frame = preprocess_stack(images, card.preprocessing, MASAM_DEPTH)
        ref = masam.reference_forward(card, torch.from_numpy(tensor))
        assert _worst(predictor.embeddings, ref["embeddings"]) <= EMBEDDING_TOL
        assert ref["low_res_logits"].shape[-1] == 128  # full resolution
        error = _worst(result.low_res_logits, ref["low_res_logits"])
        assert error <= LOGIT_TOL
        assert result.labels.shape == (MASAM_DEPTH, *images[0].shape[:2])
        _assert_labels_are_upstreams(card, result.labels, ref, error, frame.original_hw)


def _assert_masks_are_upstreams(card, got: np.ndarray, low_res: torch.Tensor, logit_error: float,
                                shape: tuple[int, int]) -> None:
    """validation_sam's masks from the reference's logits (legacy: nearest, raw logits > 0.5;
    2025: bilinear, sigmoid > 0.5): equal wherever the graphs' difference cannot flip them."""
    pre = card.preprocessing
    frame = ImageFrame(shape, resized_shape(*shape, pre), pre.image_size)
    scores = mask_scores(low_res.numpy(), frame, pre)
    want = up.medsa_masks(low_res, *shape, card.checkpoint.get("era", "legacy"))
    up.assert_agree_where_decided(got, want, up.decision_margin(scores, pre.mask_threshold),
                                  up.graph_bound(logit_error))
    assert 0 < want.mean() < 1  # masks with boundaries


def _legacy_clicks(rng, count: int, shape) -> np.ndarray:
    """(count, 1, 2) clicks as Med-SA's ``random_click`` gives them: (row, col)."""
    return np.stack([rng.uniform(0, shape[0], count), rng.uniform(0, shape[1], count)], -1)[:, None]


def _as_upstream_feeds_them(clicks: np.ndarray, shape, size: int) -> torch.Tensor:
    """Med-SA hands (row, col) in the S×S frame to a prompt encoder that reads (x, y)."""
    return torch.from_numpy((clicks * [size / shape[0], size / shape[1]]).astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_medsa_2d_runtime_equals_upstream_with_legacy_clicks(bundles, cards, real_slices, backend):
    card, predictor = cards["medsa"], Predictor(bundles["medsa"], backend=backend, threads=2)
    rng = np.random.default_rng(0)
    for item in real_slices:
        shape = item.image.shape[:2]
        clicks = _legacy_clicks(rng, 3, shape)
        predictor.set_image(item.image)
        got = predictor.predict(point_coords=clicks, point_labels=np.ones((3, 1)))
        tensor, _ = preprocess(item.image, card.preprocessing)  # one image, three prompts:
        ref = medsa.reference_forward(card, torch.from_numpy(tensor),  # Med-SA repeats it
                                      _as_upstream_feeds_them(clicks, shape, card.image_size),
                                      torch.ones(3, 1))
        assert _worst(predictor.image_embedding, ref["embeddings"]) <= EMBEDDING_TOL
        error = _worst(got.low_res_logits, ref["low_res_logits"])
        assert error <= LOGIT_TOL, item.name
        assert got.masks.shape == (3, 1, *shape)
        _assert_masks_are_upstreams(card, got.masks, ref["low_res_logits"], error, shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_medsa_3d_runtime_equals_upstream_on_real_stacks(bundles, cards, backend):
    """One encoder call per stack; each slice decoded with its own click, as Med-SA validates."""
    card, predictor = cards["medsa3d"], Predictor(bundles["medsa3d"], backend=backend, threads=2)
    rng = np.random.default_rng(1)
    for stack in bundled_stacks(MEDSA_3D_DEPTH, count=2):
        images = [s.image for s in stack]
        shape = images[0].shape[:2]
        clicks = _legacy_clicks(rng, MEDSA_3D_DEPTH, shape)
        predictor.set_volume(np.stack(images))
        got = []
        for index in range(MEDSA_3D_DEPTH):
            predictor.select_slice(index)
            got.append(predictor.predict(point_coords=clicks[index], point_labels=[1]))
        tensor, _ = preprocess_stack(images, card.preprocessing, MEDSA_3D_DEPTH)
        ref = medsa.reference_forward(card, torch.from_numpy(tensor),
                                      _as_upstream_feeds_them(clicks, shape, card.image_size),
                                      torch.ones(MEDSA_3D_DEPTH, 1))
        assert _worst(predictor.embeddings, ref["embeddings"]) <= EMBEDDING_TOL
        error = _worst(np.stack([r.low_res_logits for r in got]), ref["low_res_logits"])
        assert error <= LOGIT_TOL
        _assert_masks_are_upstreams(card, np.stack([r.masks for r in got]),
                                    ref["low_res_logits"], error, shape)


# -- runtime contract ------------------------------------------------------------------------------
def test_stack_depth_and_decoder_kind_are_enforced(bundles, real_slices):
    stack = [s.image for s in bundled_stacks(MASAM_DEPTH, count=1)[0]]
    masam_rt = Predictor(bundles["masam"], threads=1)
    with pytest.raises(StackDepthError, match="stack of 5 adjacent slices; got 4"):
        masam_rt.set_volume(stack[:4])
    with pytest.raises(StackDepthError, match="set_volume"):
        masam_rt.set_image(stack[0])
    with pytest.raises(StackDepthError, match=r"\(D, H, W"):
        masam_rt.set_volume(stack[0][..., 0])  # one (H, W) image is no stack
    with pytest.raises(ImageError, match="share one size"):
        masam_rt.set_volume(stack[:4] + [real_slices[0].image])
    with pytest.raises(StackDepthError, match="4 adjacent slices; got 5"):
        Predictor(bundles["medsa3d"], threads=1).set_volume(stack)
    samed_rt = Predictor(bundles["samed"], threads=1)
    samed_rt.set_image(stack[0])
    with pytest.raises(PromptError, match="segment"):
        samed_rt.predict(point_coords=[[5, 5]], point_labels=[1])
    medsa_rt = Predictor(bundles["medsa"], threads=1)
    medsa_rt.set_image(stack[0])
    with pytest.raises(PromptError, match="takes prompts"):
        medsa_rt.segment()


def test_semantic_runtime_runs_without_torch(bundles):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from samedge.runtime import Predictor
        from samedge.runtime.transforms import window_ct
        predictor = Predictor({str(bundles["masam"])!r}, threads=1)
        hu = np.linspace(-1000, 1000, 5 * 70 * 90).reshape(5, 70, 90)
        predictor.set_volume([window_ct(s, predictor.pre) for s in hu])
        result = predictor.segment()
        assert result.labels.shape == (5, 70, 90) and result.scores.shape == (5, 5, 70, 90)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_ct_window_has_one_definition(cards):
    assert windows.apply_window is transforms.apply_window
    hu = np.array([[-1000.0, -125.0, 75.0, 275.0, 3000.0]])
    windowed = transforms.window_ct(hu, cards["samed"].preprocessing)
    assert windowed.tolist() == [[0, 0, 128, 255, 255]]
    with pytest.raises(ImageError, match="no CT window"):
        transforms.window_ct(hu, cards["medsa"].preprocessing)


# -- drift ----------------------------------------------------------------------------------------
def test_semantic_drift_compares_label_maps(bundles, cards, real_slices):
    drift = measure_drift(cards["samed"], bundles["samed"], real_slices[:2],
                          [("onnxruntime", "fp32")], threads=2)[("onnxruntime", "fp32")]
    summary = drift.summary()
    assert summary["slices"] == 2 and summary["pixel_agreement_min"] >= LABEL_AGREEMENT
    assert set(summary["class_dice_mean"]) <= {0, 1, 2, 3} and summary["dice_min"] >= 0.99
    assert summary["logits_max_abs"] <= LOGIT_TOL
    stacks = bundled_stacks(MASAM_DEPTH, count=1)
    drift = measure_drift(cards["masam"], bundles["masam"], [], [("openvino", "fp16")],
                          threads=2, stacks=stacks)[("openvino", "fp16")]
    assert drift.summary()["slices"] == MASAM_DEPTH
    assert drift.summary()["pixel_agreement_mean"] >= 0.99  # FP16 weights: small, real drift
