"""The runtime against the FP32 PyTorch model on the real LiteMedSAM weights and real slices."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from samedge.data.prompts import auto_boxes
from samedge.errors import BundleError, PromptError
from samedge.export.bundle import write_manifest
from samedge.models.reference import TorchReference
from samedge.runtime import Bundle, Predictor

# Runtime low-res logits vs torch, float32, end to end. Each graph alone is held to 1e-4 at
# export (measured: embeddings 4e-6, decoder logits 4.4e-5); chained, the encoder's error passes
# through the decoder as well, and the worst pixel over 9 real slices x 5 boxes measured
# 1.03e-4 to 1.06e-4 between runs (ONNX Runtime thread scheduling). 2e-4 keeps the check
# meaningful (a wrong transform or a dropped bias moves logits by >1e-2) without sitting on it.
LOGIT_TOL = dict(atol=2e-4, rtol=1e-4)


def dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2 * (a & b).sum() / total


@pytest.fixture(scope="module")
def references(litemedsam_card, real_slices):
    reference = TorchReference(litemedsam_card)
    out = []
    for item in real_slices:
        reference.set_image(item.image)
        boxes = auto_boxes(item.image)
        out.append((item, boxes, reference.predict(boxes=boxes)))
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp32_masks_agree_with_pytorch_on_every_prompt(litemedsam_bundle, references, backend):
    predictor = Predictor(litemedsam_bundle, backend=backend, threads=2)
    for item, boxes, expected in references:
        predictor.set_image(item.image)
        result = predictor.predict(boxes=boxes, return_logits=True)
        assert result.masks.shape == (len(boxes), 1, *item.image.shape[:2])
        np.testing.assert_allclose(result.low_res_logits, expected["low_res_logits"], **LOGIT_TOL)
        for got, want in zip(result.masks > 0, expected["logits"] > 0):
            assert dice(got, want) >= 0.99, item.name


def test_decoder_takes_1_to_16_prompts_and_points(litemedsam_bundle, litemedsam_card,
                                                  real_slices):
    item = next(s for s in real_slices if s.name == "693_J2KI.dcm")
    reference = TorchReference(litemedsam_card)
    reference.set_image(item.image)
    predictor = Predictor(litemedsam_bundle, threads=2)
    predictor.set_image(item.image)
    rng = np.random.default_rng(1)
    box = auto_boxes(item.image)[0]
    for count, points in ((1, 1), (4, 7), (16, 16)):
        coords = rng.uniform(box[:2], box[2:], (count, points, 2))
        labels = rng.integers(0, 2, (count, points))
        boxes = np.tile(box, (count, 1))
        got = predictor.predict(point_coords=coords, point_labels=labels, boxes=boxes)
        want = reference.predict(point_coords=coords, point_labels=labels, boxes=boxes)
        assert got.masks.shape[0] == count
        np.testing.assert_allclose(got.low_res_logits, want["low_res_logits"], **LOGIT_TOL)


def test_single_prompt_is_unbatched_and_multimask_gives_three(litemedsam_bundle, real_slices):
    predictor = Predictor(litemedsam_bundle, threads=2)
    image = real_slices[0].image
    predictor.set_image(image)
    single = predictor.predict(boxes=auto_boxes(image)[0])
    assert single.masks.shape == (1, *image.shape[:2]) and single.masks.dtype == bool
    multi = predictor.predict(point_coords=[[60, 60]], point_labels=[1], multimask_output=True)
    assert multi.masks.shape == (3, *image.shape[:2]) and multi.scores.shape == (3,)
    again = predictor.predict(boxes=auto_boxes(image)[0], mask_input=single.low_res_logits)
    assert again.masks.shape == single.masks.shape


def test_prompt_errors(litemedsam_bundle, real_slices):
    predictor = Predictor(litemedsam_bundle, threads=2)
    with pytest.raises(PromptError, match="set_image"):
        predictor.predict(boxes=[0, 0, 5, 5])
    predictor.set_image(real_slices[0].image)  # 128 x 128
    with pytest.raises(PromptError, match="empty prompt"):
        predictor.predict()
    with pytest.raises(PromptError, match="outside"):
        predictor.predict(boxes=[0, 0, 200, 50])
    with pytest.raises(PromptError, match="x1 < x0"):
        predictor.predict(boxes=[50, 0, 10, 50])
    with pytest.raises(PromptError, match="mask_input"):
        predictor.predict(boxes=[0, 0, 5, 5], mask_input=np.zeros((1, 64, 64)))


def test_tampered_bundle_is_refused(bundle_copy):
    target = bundle_copy / "decoder.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx does not match"):
        Predictor(bundle_copy)


def test_incomplete_bundle_is_refused(bundle_copy):
    (bundle_copy / "openvino" / "encoder_fp32.bin").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle(bundle_copy)


def test_unsupported_bundle_version_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version 99"):
        Bundle(bundle_copy)


def test_missing_precision_names_what_exists(litemedsam_bundle):
    with pytest.raises(BundleError, match="encoder/onnx/fp32"):
        Predictor(litemedsam_bundle, backend="onnxruntime", precision="int8")


def test_runtime_imports_and_predicts_without_torch(litemedsam_bundle):
    """The bedside process has numpy and one backend; torch must never be imported."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from samedge.runtime import Predictor
        predictor = Predictor({str(litemedsam_bundle)!r}, backend="onnxruntime", threads=1)
        image = (np.arange(96 * 80).reshape(96, 80) % 251).astype(np.uint8)
        predictor.set_image(image)
        result = predictor.predict(boxes=np.array([[10, 10, 60, 70], [0, 0, 80, 96]]))
        assert result.masks.shape == (2, 1, 96, 80), result.masks.shape
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_predictor_follows_the_bundles_default_variant(bundle_copy, monkeypatch):
    """A bedside caller that names no backend runs what the pipeline chose (the fastest variant
    that passed its gate); an explicit choice wins, and a default whose backend is not installed
    falls back to FP32 on one that is."""
    from samedge.runtime import variants as module

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["default_variant"] = {"backend": "openvino", "precision": "fp16",
                                   "decoder_precision": "fp32"}
    write_manifest(bundle_copy, manifest)  # as the pipeline records it
    chosen = Predictor(bundle_copy)
    assert (chosen.backend, chosen.precision, chosen.decoder_precision) == \
        ("openvino", "fp16", "fp32")
    assert chosen.encoder.name == "openvino"
    assert Predictor(bundle_copy, precision="fp32").decoder_precision == "fp32"
    explicit = Predictor(bundle_copy, backend="onnxruntime")
    assert (explicit.backend, explicit.precision) == ("onnxruntime", "fp32")
    monkeypatch.setattr(module, "installed", lambda backend: backend == "onnxruntime")
    fallback = Predictor(bundle_copy)
    assert (fallback.backend, fallback.precision) == ("onnxruntime", "fp32")


def test_large_prompt_batches_split_into_the_backends_decode_batch(litemedsam_bundle, real_slices):
    """ONNX Runtime decodes 16 boxes faster per box one at a time than in one call of 16; the
    split is invisible to the caller: the same masks, scores and logits, in order."""
    predictor = Predictor(litemedsam_bundle, backend="onnxruntime", threads=2)
    assert predictor.decoder.decode_batch == 1
    image = real_slices[0].image
    predictor.set_image(image)
    boxes = np.concatenate([auto_boxes(image), auto_boxes(image)[:2]])  # 7 boxes, 7 calls
    split = predictor.predict(boxes=boxes, return_logits=True)
    predictor.decoder.decode_batch = None
    whole = predictor.predict(boxes=boxes, return_logits=True)
    np.testing.assert_allclose(split.masks, whole.masks, atol=1e-5)
    np.testing.assert_allclose(split.scores, whole.scores, atol=1e-6)
    assert split.masks.shape[0] == len(boxes)


def test_set_image_gives_one_mask_whatever_the_dtype(litemedsam_bundle):
    """The same real CT slice as uint8, float [0, 1], uint16 and HU (with the window that made
    the uint8): identical masks at 128² and a 300×400 crop of a 512² slice. Before the dtype
    contract, floats and uint16 were clipped to 0..255 after resizing (Dice 0.36–0.77)."""
    import upstream_pipelines as up
    from pydicom.data import get_testdata_file

    predictor = Predictor(litemedsam_bundle, backend="onnxruntime", threads=2)
    for hu in (up.hu_of(get_testdata_file("CT_small.dcm")),
               up.hu_of(get_testdata_file("J2K_pixelrep_mismatch.dcm"))[100:400, 50:450]):
        u8 = np.rint((np.clip(hu, -160, 240) + 160) * 255 / 400).astype(np.uint8)
        box = np.array([hu.shape[1] * 0.2, hu.shape[0] * 0.2, hu.shape[1] * 0.8, hu.shape[0] * 0.7])
        predictor.set_image(u8)
        want = predictor.predict(boxes=box).masks
        assert want.any() and not want.all()
        for image, window in ((u8 / 255.0, None), (u8.astype(np.uint16) * 257, None),
                              (hu, (40, 400))):
            predictor.set_image(image, window=window)
            np.testing.assert_array_equal(predictor.predict(boxes=box).masks, want)
