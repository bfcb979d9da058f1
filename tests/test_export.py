"""ONNX export of SAM ViT (reduced config, random weights): parity, engine-friendliness, Meta's
interface, and the atomicity of bundle writing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import upstream_pipelines as up  # tests/ is on sys.path

from samedge.data.prompts import auto_boxes
from samedge.errors import BundleError, ExportError
from samedge.export import exporter
from samedge.export.exporter import export_bundle
from samedge.models import build_model
from samedge.models.reference import TorchReference
from samedge.models.sam import SamConfig
from samedge.runtime import Predictor
from samedge.runtime.transforms import preprocess

pytestmark = pytest.mark.slow  # every test here exports models

SMALL_VIT = SamConfig(embed_dim=96, depth=2, num_heads=2, global_attn_indexes=(1,),
                      image_size=256)


@pytest.fixture(scope="module")
def sam_card():
    card = build_model("sam", config=SMALL_VIT)
    torch.manual_seed(1)
    with torch.no_grad():  # random rel-pos and pos-embed so the MatMul rewrite is exercised
        for name, param in card.model.image_encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.normal_(0, 0.5)
    return card


@pytest.fixture(scope="module")
def sam_bundle(tmp_path_factory, sam_card, real_slices):
    out = tmp_path_factory.mktemp("sam") / "bundle"
    images = [s.image for s in real_slices if s.name in ("CT_small.dcm", "examples_overlay.dcm")]
    export_bundle(sam_card, out, images, backends=("onnxruntime",))
    return out


def test_vit_encoder_graph_has_no_einsum(sam_bundle):
    ops = {node.op_type for node in onnx.load(str(sam_bundle / "encoder.onnx")).graph.node}
    assert "Einsum" not in ops and "MatMul" in ops


def test_vit_runtime_matches_pytorch_with_multimask(sam_bundle, sam_card, real_slices):
    reference = TorchReference(sam_card)
    predictor = Predictor(sam_bundle, threads=2)
    for item in real_slices[:5]:
        reference.set_image(item.image)
        predictor.set_image(item.image)
        boxes = auto_boxes(item.image)
        np.testing.assert_allclose(predictor.image_embedding, reference.embedding.numpy(),
                                   atol=5e-4, rtol=1e-4)
        got = predictor.predict(boxes=boxes)  # SAM's default: three masks per prompt
        want = reference.predict(boxes=boxes, multimask_output=True)
        assert got.masks.shape == (5, 3, *item.image.shape[:2])
        np.testing.assert_allclose(got.low_res_logits, want["low_res_logits"], atol=1e-4,
                                   rtol=1e-4)
        np.testing.assert_allclose(got.scores, want["scores"], atol=1e-4)


def test_sam_interface_matches_metas_onnx_model(sam_bundle, sam_card, real_slices):
    """Same names and outputs as segment-anything's SamOnnxModel, on a non-square image."""
    from segment_anything.utils.onnx import SamOnnxModel

    session = ort.InferenceSession(str(sam_bundle / "decoder_sam.onnx"))
    assert [i.name for i in session.get_inputs()] == [
        "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
        "orig_im_size"]
    assert [o.name for o in session.get_outputs()] == ["masks", "iou_predictions",
                                                       "low_res_masks"]
    sam_card.model.mask_threshold = 0.0
    meta = SamOnnxModel(sam_card.model, return_single_mask=False).eval()
    image = next(s for s in real_slices if s.name == "examples_overlay.dcm").image  # 300 x 484
    tensor, _ = preprocess(image, sam_card.preprocessing)
    with torch.no_grad():
        embedding = sam_card.model.image_encoder(torch.from_numpy(tensor)).numpy()
    for points in (1, 3, 6):  # num_points is dynamic
        feed = {
            "image_embeddings": embedding,
            "point_coords": np.random.default_rng(points).uniform(0, 150, (1, points, 2))
            .astype(np.float32),
            "point_labels": np.array([[1] * (points - 1) + [-1]], np.float32),
            "mask_input": np.zeros((1, 1, 64, 64), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([300, 484], np.float32),
        }
        got = session.run(None, feed)
        with torch.no_grad():
            want = meta(*(torch.from_numpy(v) for v in feed.values()))
        assert got[0].shape == (1, 4, 300, 484)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-3, rtol=1e-3)


def test_decoder_graph_has_no_shape_deciding_inputs(sam_bundle):
    model = onnx.load(str(sam_bundle / "decoder.onnx"))
    names = [i.name for i in model.graph.input]
    assert "orig_im_size" not in names
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    assert dims["point_coords"] == ["prompts", "points", 2]
    assert dims["image_embeddings"] == [1, 256, 16, 16]


def test_failed_export_leaves_previous_bundle_and_no_staging(sam_card, real_slices, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "samedge-bundle"}')

    def broken(*args, **kwargs):
        raise ExportError("decoder differs from PyTorch")

    monkeypatch.setattr(exporter, "validate_graph", broken)
    with pytest.raises(ExportError):
        export_bundle(sam_card, out, [real_slices[0].image], backends=("onnxruntime",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (out / "manifest.json").read_text() == '{"format": "samedge-bundle"}'


def test_export_refuses_to_overwrite_a_foreign_folder(sam_card, real_slices, tmp_path):
    (tmp_path / "notes.txt").write_text("patient data")
    with pytest.raises(BundleError, match="refusing"):
        export_bundle(sam_card, tmp_path, [real_slices[0].image])
    assert (tmp_path / "notes.txt").read_text() == "patient data"


def test_medsam_checkpoint_exports_with_its_own_preprocessing(sam_card, real_slices, tmp_path):
    """MedSAM's released file is a flat SAM state dict; training files wrap it under 'model'."""
    path = tmp_path / "medsam_train.pth"
    torch.save({"model": sam_card.model.state_dict(), "epoch": 10}, path)
    card = build_model("medsam", checkpoint=path, config=SMALL_VIT)
    assert card.preprocessing.resize == "stretch" and card.preprocessing.normalize == "minmax"
    image = next(s for s in real_slices if s.name == "examples_overlay.dcm").image
    export_bundle(card, tmp_path / "bundle", [image], backends=("onnxruntime",),
                  sam_interface=False)
    reference, predictor = TorchReference(card), Predictor(tmp_path / "bundle", threads=2)
    reference.set_image(image)
    predictor.set_image(image)
    boxes = auto_boxes(image)
    got = predictor.predict(boxes=boxes, return_logits=True)
    want = reference.predict(boxes=boxes, multimask_output=False)
    assert got.masks.shape == (5, 1, 300, 484)
    np.testing.assert_allclose(got.masks, want["logits"], atol=1e-3, rtol=1e-3)
    # MedSAM_Inference.py's masks from the reference's logits: sigmoid, bilinear, > 0.5
    error = float(np.abs(got.low_res_logits - want["low_res_logits"]).max())
    upstream = up.medsam_mask(torch.from_numpy(want["low_res_logits"]), 300, 484)
    up.assert_agree_where_decided(got.masks > 0.5, upstream,
                                  up.decision_margin(want["logits"], 0.5), up.graph_bound(error))
    assert 0 < upstream.mean() < 1
