"""SAM-Adapter through the command line, as a user runs it: ``pipeline`` (export, validation,
FP16/INT8 precision step), ``predict`` on a colour PNG and a DICOM slice, ``build`` + ``validate``
rebuilding the FP32 reference from the manifest. Synthetic checkpoint in the exact upstream layout
(SMALL ViT, trained size 128); masks are compared with upstream's ``sigmoid > 0.5`` of the
torch.fft model.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samedge.cli import main
from samedge.data.bundled import bundled_slices, held_out_slices, pipeline_validation_slices
from samedge.data.open import load_image
from samedge.models import build_model
from samedge.models.reference import TorchReference

AGREEMENT = 0.999


def _run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--quiet", "--threads", "2", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _artifacts(bundle: Path, precision: str) -> list[dict]:
    return [a for a in _manifest(bundle)["artifacts"] if a["precision"] == precision]


@pytest.fixture(scope="module")
def checkpoint(small_checkpoints) -> Path:
    return small_checkpoints["sam_adapter"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, checkpoint) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sam_adapter_cli") / "bundle"
    code, stdout, stderr = _run("pipeline", "--family", "sam_adapter", "--checkpoint", checkpoint,
                                "-o", out)
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def card(checkpoint):
    return build_model("sam_adapter", checkpoint=checkpoint)


def test_pipeline_gates_label_maps_and_every_precision(pipeline):
    bundle, report = pipeline
    manifest = _manifest(bundle)
    assert manifest["model"]["family"] == "sam_adapter"
    assert manifest["graphs"]["decoder"]["variant"] == "binary"
    fp32 = next(a for a in manifest["artifacts"] if a["graph"] == "encoder"
                and a["format"] == "onnx" and a["precision"] == "fp32")["validation"]["onnxruntime"]
    assert fp32["slices"] == len(pipeline_validation_slices())
    assert fp32["pixel_agreement_min"] >= AGREEMENT
    assert set(map(int, fp32["class_dice_mean"])) == {0, 1}  # JSON keys are strings
    build = next(b for b in manifest["builds"] if b.get("precision") == "int8")
    assert sorted(build["added"] + [r["variant"] for r in build["rejected"]]) == \
        ["decoder openvino_ir int8", "encoder openvino_ir int8"]
    for artifact in _artifacts(bundle, "int8"):
        entry = artifact["validation"]["openvino"]
        assert entry["gate"]["passed"] and {"pixel_agreement_mean", "class_dice_min"} <= set(entry)
    # the FP16 IR (DFT matrices in FP16 too) stays only inside half its allowance (the
    # pipeline's margin); otherwise it leaves the bundle and the removal is recorded
    fp16 = {a["graph"] for a in _artifacts(bundle, "fp16")}
    dropped = {r["variant"] for b in manifest["builds"] if b.get("step") == "pipeline gate"
               for r in b["rejected"]}
    assert fp16 == {"encoder", "decoder"} or (not fp16 and any("fp16" in v for v in dropped))
    report = " ".join(report.split())  # rich wraps long lines
    count = len(pipeline_validation_slices())
    assert f"label maps (argmax) on {count} real slices" in report and "default variant:" in report
    # last, every variant left in the bundle is gated on slices no earlier step read
    assert "held-out check: every variant in the bundle" in report
    run = json.loads((bundle.parent / "bundle-validation" / "validation.json").read_text())
    assert run["slices"] == [s.name for s in held_out_slices()]
    assert run["passed"]


def test_predict_thresholds_a_colour_image_like_upstream(pipeline, card, tmp_path):
    """An RGB PNG (channels differ, so the per-channel ImageNet mean/std matter)."""
    grey = next(s for s in bundled_slices() if s.name == "examples_overlay.dcm").image[..., 0]
    rgb = np.stack([grey, np.roll(grey, 25, axis=1), 255 - grey], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    code, out, err = _run("predict", pipeline[0], tmp_path / "photo.png", "--precision", "fp32",
                          "-o", tmp_path / "m")
    assert code == 0, err
    labels = np.asarray(Image.open(tmp_path / "m.png"))
    reference = TorchReference(card)  # the torch.fft model
    reference.set_image(load_image(tmp_path / "photo.png").image)
    want = reference.segment()["labels"][0]
    assert labels.shape == rgb.shape[:2] and set(np.unique(labels)) <= {0, 1}
    assert (labels == want).mean() >= AGREEMENT and np.unique(want).size == 2
    code, _, err = _run("predict", pipeline[0], tmp_path / "photo.png", "--box", "5,5,60,60",
                        "-o", tmp_path / "x")
    assert code == 2 and "sam_adapter is prompt-free" in " ".join(err.split())


def test_build_fp16_and_validate_rebuild_the_reference(pipeline, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(pipeline[0], bundle)
    code, _, err = _run("build", bundle, "--backend", "onnxruntime", "--precision", "fp16")
    assert code == 0, err
    added = [a for a in _artifacts(bundle, "fp16") if a["format"] == "onnx"]
    assert {a["graph"] for a in added} == {"encoder", "decoder"}
    assert all(a["validation"]["onnxruntime"]["gate"]["passed"] for a in added)
    code, out, err = _run("validate", bundle, "--report", tmp_path / "report")
    assert code == 0, out + err
    assert "onnxruntime fp16" in " ".join(out.split())
