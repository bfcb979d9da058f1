"""The adaptation families through the command line, as a user runs them.

``samedge pipeline`` / ``export`` / ``predict`` on synthetic checkpoints in each upstream layout
(``upstream_layouts``; tiny ViT, image 128): SAMed (2-D, prompt-free semantic), MA-SAM (depth,
semantic) and Med-SA 3D (depth, point prompts). Label maps written by ``predict`` are compared
with the FP32 PyTorch model's argmax on the stack the CLI should have picked, so a wrong centre
slice, window or point order fails here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import upstream_layouts as ul  # tests/ is on sys.path (pytest's default rootdir-relative import)
from PIL import Image
from pydicom.uid import generate_uid

from samedge.cli import main
from samedge.data.bundled import bundled_slices, bundled_volume, held_out_stacks
from samedge.data.dicom import read_dicom_series
from samedge.data.nifti import read_nifti
from samedge.data.open import load_image
from samedge.export.bundle import write_manifest
from samedge.models import build_model
from samedge.models.masam import MASAM_CT_WINDOW
from samedge.models.reference import TorchReference
from samedge.models.samed import SAMED_CT_WINDOW
from samedge.runtime import Predictor

pytestmark = pytest.mark.slow  # every test here exports models

SMALL = ul.SMALL
MASAM_DEPTH, MEDSA_DEPTH = 3, 4
AGREEMENT = 0.999


def _run(*argv: str) -> tuple[int, str, str]:
    """``samedge ARGV`` in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--quiet", "--threads", "2", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def _dicom(name: str) -> Path:
    return next(s for s in bundled_slices() if s.name == name).source


@pytest.fixture(scope="module")
def ckpt(small_checkpoints) -> dict[str, Path]:
    return small_checkpoints


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> Path:
    """A 6-slice CT series (CT_small.dcm shifted per slice), files named against their order."""
    folder = tmp_path_factory.mktemp("ct_series")
    template = pydicom.dcmread(_dicom("CT_small.dcm"))
    series_uid = generate_uid()
    for i in range(6):
        ds = copy.deepcopy(template)
        pixels = np.roll(template.pixel_array, 6 * i, axis=1)
        ds.PixelData = pixels.astype(template.pixel_array.dtype).tobytes()
        x, y, z = (float(v) for v in template.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.InstanceNumber = i + 1
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.save_as(folder / f"im{5 - i:02d}.dcm")  # alphabetical order != anatomical order
    return folder


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, ckpt) -> dict[str, tuple[Path, str]]:
    """``samedge pipeline`` once per family: bundle folder and printed report."""
    out = tmp_path_factory.mktemp("family_cli")
    nifti = bundled_volume().source
    runs = {
        "samed": ["--family", "samed", "--base", ckpt["base"], "--checkpoint", ckpt["samed"],
                  "--image-size", "128", "--backends", "onnxruntime",
                  "--validation-data", _dicom("CT_small.dcm"), _dicom("MR_small.dcm"),
                  "--held-out-data", _dicom("examples_overlay.dcm")],
        "masam": ["--family", "masam", "--base", ckpt["base"], "--checkpoint", ckpt["masam"],
                  "--image-size", "128", "--depth", MASAM_DEPTH, "--scale", "0.5",
                  "--validation-data", nifti],
        "medsa3d": ["--family", "medsa", "--checkpoint", ckpt["medsa3d"], "--depth", MEDSA_DEPTH,
                    "--backends", "onnxruntime"],
    }
    results = {}
    for name, args in runs.items():
        code, stdout, stderr = _run("pipeline", *args, "-o", out / name)
        assert code == 0, (name, stderr)
        results[name] = (out / name, stdout)
    return results


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _validation(bundle: Path, backend: str = "onnxruntime") -> dict:
    fmt = "onnx" if backend == "onnxruntime" else "openvino_ir"
    encoder = next(a for a in _manifest(bundle)["artifacts"] if a["graph"] == "encoder"
                   and a["format"] == fmt and a["precision"] == "fp32")
    return encoder["validation"][backend]


# -- pipeline ------------------------------------------------------------------------------------
def test_pipeline_samed_reports_label_agreement(pipelines):
    bundle, report = pipelines["samed"]
    assert _manifest(bundle)["model"]["decoder"] == "semantic"
    validation = _validation(bundle)
    assert validation["slices"] == 2  # the two --validation-data slices
    assert validation["pixel_agreement_min"] >= AGREEMENT
    assert len(validation["class_dice_mean"]) > 1  # the label maps are not uniform
    assert "label maps (argmax) on 2 real slices" in report and "labels = PyTorch" in report
    assert re.search(r"onnxruntime .* fp32 .* ms .* ms \(1 sl\.\) .* 100\.000 %", report)
    # --held-out-data: the last step gates the bundle on the user's other patients
    run = json.loads((bundle.parent / "samed-validation" / "validation.json").read_text())
    assert run["slices"] == ["examples_overlay.dcm"] and run["passed"]
    assert "held-out check: every variant in the bundle" in " ".join(report.split())


def test_pipeline_masam_runs_on_stacks_of_a_volume(pipelines):
    bundle, report = pipelines["masam"]
    manifest = _manifest(bundle)
    assert manifest["model"]["depth"] == MASAM_DEPTH
    assert manifest["model"]["checkpoint"]["scale"] == 0.5  # --scale reached the loader
    assert manifest["graphs"]["encoder"]["inputs"][0]["shape"][0] == MASAM_DEPTH
    for backend in ("onnxruntime", "openvino"):
        validation = _validation(bundle, backend)
        stacks = validation["stacks"]
        assert len(stacks) == 2 and all(len(s) == MASAM_DEPTH for s in stacks)
        z = [[int(re.search(r"z=(\d+)", n).group(1)) for n in s] for s in stacks]
        assert all(np.diff(s).tolist() == [1] * (MASAM_DEPTH - 1) for s in z)  # adjacent
        assert validation["slices"] == 2 * MASAM_DEPTH
        assert validation["pixel_agreement_min"] >= AGREEMENT
    assert "on 2 real stacks of 3 adjacent slices" in report
    assert "(3 sl.)" in report and "encoder / stack" in report
    assert len(re.findall(r"openvino", report)) >= 2  # fp32 and fp16 rows
    assert "no held-out check: the validation data given" in " ".join(report.split())


def test_pipeline_medsa_3d_decodes_prompts_on_stacks(pipelines):
    bundle, report = pipelines["medsa3d"]
    validation = _validation(bundle)
    assert len(validation["stacks"]) == 3 and validation["dice_min"] >= 0.99
    assert "stacks of 4 adjacent slices (5 boxes + 5 clicks on each stack's centre" in report
    assert re.search(r"onnxruntime .* fp32 .* ms .* ms .* ms .* 1\.0000", report)
    # the last step measures stacks no earlier step read (the anatomical volume, a mid EPI stack)
    assert "held-out check: every variant in the bundle" in " ".join(report.split())
    run = json.loads((bundle.parent / "medsa3d-validation" / "validation.json").read_text())
    assert run["slices"] == [stack[len(stack) // 2].name for stack in held_out_stacks(MEDSA_DEPTH)]


# -- export --------------------------------------------------------------------------------------
def test_export_masam_validates_on_a_dicom_series(ckpt, ct_series, tmp_path):
    out = tmp_path / "masam"
    code, _, err = _run("export", "--family", "masam", "--base", ckpt["base"], "--checkpoint",
                        ckpt["masam"], "--image-size", "128", "--depth", MASAM_DEPTH,
                        "--backends", "onnxruntime", "--validation-data", ct_series, "-o", out)
    assert code == 0, err
    stacks = _manifest(out)["validation_inputs"]
    order = [f"im{5 - i:02d}.dcm" for i in range(6)]  # anatomical order of the files
    assert [len(s) for s in stacks] == [MASAM_DEPTH] * 2
    for stack in stacks:
        positions = [order.index(name) for name in stack]
        assert np.diff(positions).tolist() == [1] * (MASAM_DEPTH - 1), stack


def test_export_medsa_3d_groups_dicom_files_into_their_series(ckpt, ct_series, tmp_path):
    files = sorted(ct_series.glob("*.dcm"))  # scans/*.dcm, as a shell passes them
    code, _, err = _run("export", "--family", "medsa", "--checkpoint", ckpt["medsa3d"],
                        "--depth", MEDSA_DEPTH, "--backends", "onnxruntime",
                        "--validation-data", *files, "-o", tmp_path / "m")
    assert code == 0, err
    assert [len(s) for s in _manifest(tmp_path / "m")["validation_inputs"]] == [MEDSA_DEPTH] * 2


def test_export_samed_keeps_working_on_the_default_slices(ckpt, tmp_path):
    code, out, err = _run("export", "--family", "samed", "--base", ckpt["base"], "--checkpoint",
                          ckpt["samed"], "--image-size", "128", "--backends", "onnxruntime",
                          "-o", tmp_path / "s")
    assert code == 0, err
    assert (tmp_path / "s" / "decoder.onnx").is_file() and "class_logits" in out


@pytest.mark.parametrize("data, message", [
    ("single", "single 2-D image"),
    ("short", "has 2 slice(s); this model's encoder takes a stack of 3"),
])
def test_depth_validation_data_must_be_volumes(ckpt, tmp_path, data, message):
    path = _dicom("CT_small.dcm") if data == "single" else _short_nifti(tmp_path, 2)
    code, _, err = _run("export", "--family", "masam", "--base", ckpt["base"], "--checkpoint",
                        ckpt["masam"], "--image-size", "128", "--depth", MASAM_DEPTH,
                        "--validation-data", path, "-o", tmp_path / "b")
    assert code == 2 and message in " ".join(err.split())
    assert not (tmp_path / "b").exists()


def test_scale_is_refused_by_families_without_fact(ckpt):
    code, _, err = _run("export", "--family", "samed", "--base", ckpt["base"], "--checkpoint",
                        ckpt["samed"], "--scale", "2")
    assert code == 2 and "does not take scale" in err


# -- predict -------------------------------------------------------------------------------------
def _short_nifti(folder: Path, slices: int) -> Path:
    data = np.asarray(nib.load(bundled_volume().source).dataobj)  # (128, 96, 24, 2)
    path = folder / f"short{slices}.nii.gz"
    nib.save(nib.Nifti1Image(data[..., :slices, 0].astype(np.float32), np.eye(4)), path)
    return path


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def masam_card(ckpt):
    return build_model("masam", base=ckpt["base"], checkpoint=ckpt["masam"], image_size=128,
                       depth=MASAM_DEPTH, scale=0.5)


def test_predict_samed_writes_the_label_map_in_its_ct_window(pipelines, tmp_path):
    bundle, _ = pipelines["samed"]
    ct = _dicom("CT_small.dcm")
    code, out, err = _run("predict", bundle, ct, "-o", tmp_path / "seg")
    assert code == 0, err
    labels, overlay = _png(tmp_path / "seg.png"), _png(tmp_path / "seg_overlay.png")
    assert labels.shape == (128, 128) and overlay.shape == (128, 128, 3)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and np.unique(labels).size > 1
    assert "[-125, 275] HU" in out and "4 classes" in out
    predictor = Predictor(bundle, threads=2)
    predictor.set_image(load_image(ct, window=SAMED_CT_WINDOW).image)
    assert (labels == predictor.segment().labels[0]).all()
    predictor.set_image(load_image(ct).image)  # the abdomen default would give another map
    assert (labels != predictor.segment().labels[0]).any()


def test_predict_masam_labels_the_centre_of_the_chosen_stack(pipelines, masam_card, tmp_path):
    bundle, _ = pipelines["masam"]
    nifti = bundled_volume().source
    code, out, err = _run("predict", bundle, nifti, "--frame", "0", "--slice", "7",
                          "--precision", "fp32",
                          "-o", tmp_path / "m")  # the pipeline's default may be INT8
    assert code == 0, err
    labels = _png(tmp_path / "m.png")
    assert labels.shape == (96, 128) and "z=7" in out and "fp32: as asked" in out
    reference = TorchReference(masam_card)
    reference.set_volume([s.image for s in read_nifti(nifti).stack(7, MASAM_DEPTH)])
    want = reference.segment()["labels"][MASAM_DEPTH // 2]
    assert (labels == want).mean() >= AGREEMENT
    assert np.unique(want).size > 1 and set(np.unique(labels)) <= set(range(5))


def test_predict_masam_on_a_dicom_series_uses_its_ct_window(pipelines, ct_series, tmp_path):
    bundle, _ = pipelines["masam"]
    code, out, err = _run("predict", bundle, ct_series, "--slice", "0", "-o", tmp_path / "m")
    assert code == 0, err
    assert "[-200, 250] HU" in out and "the bundle's default variant" in out
    predictor = Predictor(bundle, threads=2)  # the same default variant
    volume = read_dicom_series(ct_series, window=MASAM_CT_WINDOW)
    predictor.set_volume([s.image for s in volume.stack(0, MASAM_DEPTH)])  # edge replicated
    assert (_png(tmp_path / "m.png") == predictor.segment().labels[MASAM_DEPTH // 2]).all()


def test_predict_medsa_3d_reads_points_as_x_y(pipelines, tmp_path):
    """Med-SA 3D reads clicks as (row, col); ``--point x,y`` is image x, y and is swapped."""
    bundle, _ = pipelines["medsa3d"]
    nifti = bundled_volume().source
    code, out, err = _run("predict", bundle, nifti, "--frame", "0", "--point", "90,30",
                          "-o", tmp_path / "p")
    assert code == 0, err
    mask = _png(tmp_path / "p.png")
    assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 255}
    predictor = Predictor(bundle, threads=2)
    predictor.set_volume([s.image for s in read_nifti(nifti).stack(12, MEDSA_DEPTH)])
    want = predictor.predict(point_coords=[[30, 90]], point_labels=[1], multimask_output=False)
    assert ((mask > 0) == want.masks[0]).all()
    swapped = predictor.predict(point_coords=[[90, 30]], point_labels=[1], multimask_output=False)
    assert (want.masks[0] != swapped.masks[0]).any()  # the order matters on this model


@pytest.mark.parametrize("family, args, message", [
    ("samed", ["--box", "10,10,60,60"], "samed is prompt-free"),
    ("masam", ["--point", "10,10"], "masam is prompt-free"),
    ("medsa3d", [], "empty prompt"),
    ("masam", ["--image", "single"], "single 2-D image"),
    ("medsa3d", ["--image", "single", "--point", "5,5"], "single 2-D image"),
    ("masam", ["--image", "short"], "has 2 slice(s); this model's encoder takes a stack of 3"),
    ("medsa3d", ["--image", "short", "--point", "5,5"], "has 3 slice(s); this model's encoder "
                                                        "takes a stack of 4"),
    ("masam", ["--slice", "24"], "slice 24 out of range"),
])
def test_predict_family_errors(pipelines, tmp_path, family, args, message):
    image, args = bundled_volume().source, ["--frame", "0", *args]  # the 4-D EPI's first volume
    if "--image" in args:
        kind = args[args.index("--image") + 1]
        args = [a for a in args if a not in ("--image", kind)]
        if kind == "single":
            image = _dicom("CT_small.dcm")
        else:
            image = _short_nifti(tmp_path, 2 if family == "masam" else 3)
    code, _, err = _run("predict", pipelines[family][0], image, *args, "-o", tmp_path / "x")
    assert code == 2
    assert message in " ".join(err.split())
    assert not list(tmp_path.glob("x*.png"))


# -- INT8 / FP16 for the families: pipeline, build, validate ---------------------------------------
def _artifacts(bundle: Path, precision: str) -> list[dict]:
    return [a for a in _manifest(bundle)["artifacts"] if a["precision"] == precision]


def test_pipeline_masam_adds_only_gate_passing_int8(pipelines):
    """The pipeline's precision step on a semantic depth model: INT8 encoder and decoder are
    calibrated on stacks, measured on label maps against FP32 PyTorch, and kept only if they pass;
    the fastest passing variant becomes the bundle's default."""
    bundle, report = pipelines["masam"]
    manifest = _manifest(bundle)
    build = next(b for b in manifest["builds"] if b.get("precision") == "int8")
    assert sorted(build["added"] + [r["variant"] for r in build["rejected"]]) == \
        ["decoder openvino_ir int8", "encoder openvino_ir int8"]
    for artifact in _artifacts(bundle, "int8"):
        entry = artifact["validation"]["openvino"]
        gate = entry["gate"]
        assert gate["passed"] and entry["dice_mean"] >= 1 - gate["max_mean_dice_drop"]
        assert entry["dice_min"] >= gate["min_worst_dice"]
        assert entry["slices"] == [" | ".join(s) for s in _validation(bundle)["stacks"]]
        assert {"pixel_agreement_mean", "class_dice_min"} <= set(entry)
        assert all(p["prompt"].startswith("class ") for p in entry["per_prompt"])
    default = manifest["default_variant"]
    assert default["backend"] == "openvino" and default["timed"]
    report = " ".join(report.split())  # rich wraps the bullets where the timings put the edge
    assert "default variant: openvino" in report and "one segment() call" in report


def test_build_and_validate_a_semantic_bundle(pipelines, tmp_path):
    """``samedge build`` rebuilds SAMed's FP32 model from the manifest (no card), adds Q/DQ INT8
    graphs only where they pass, never an INT8 pair that fails together; ``validate`` then passes
    on the same data and fails under a gate no quantized model can meet."""
    bundle = tmp_path / "samed"
    shutil.copytree(pipelines["samed"][0], bundle)
    code, out, err = _run("build", bundle, "--backend", "onnxruntime", "--precision", "int8",
                          "--no-layer-errors")
    assert code in (0, 1), err
    added = _artifacts(bundle, "int8")
    assert added and all(a["format"] == "onnx" and a["validation"]["onnxruntime"]["gate"]
                         ["passed"] for a in added)
    code, out, err = _run("validate", bundle, "--report", tmp_path / "report")
    assert code == 0, out + err
    assert (tmp_path / "report" / "report.html").is_file()
    graphs = {a["graph"] for a in added}
    label = {frozenset({"encoder", "decoder"}): "onnxruntime int8",
             frozenset({"encoder"}): "onnxruntime encoder int8 + decoder fp32",
             frozenset({"decoder"}): "onnxruntime encoder fp32 + decoder int8"}[frozenset(graphs)]
    assert label in " ".join(out.split())
    code, _, err = _run("validate", bundle, "--max-dice-drop", "0", "--min-worst-dice", "1",
                        "--report", tmp_path / "strict")
    assert code == 1 and "drifted beyond the gate" in err


def test_build_int8_encoder_of_a_depth_prompt_model(pipelines, tmp_path):
    """Med-SA 3D: the INT8 encoder is calibrated on stacks of D adjacent slices and measured on
    boxes and (row, col) clicks at each stack's centre; OpenVINO runs it beside the bundle's FP32
    ONNX decoder, and ``validate`` on a volume measures that pair."""
    bundle = tmp_path / "medsa3d"
    shutil.copytree(pipelines["medsa3d"][0], bundle)
    code, _, err = _run("build", bundle, "--backend", "openvino", "--precision", "int8",
                        "--graphs", "encoder", "--no-layer-errors", "--max-dice-drop", "0.05",
                        "--min-worst-dice", "0.8")
    assert code == 0, err
    (artifact,) = _artifacts(bundle, "int8")
    assert artifact["quantization"]["calibration_inputs"] == 64
    entry = artifact["validation"]["openvino"]
    kinds = {p["prompt"].split()[0] for p in entry["per_prompt"]}
    assert kinds == {"box", "click"}
    code, out, err = _run("validate", bundle, "--data", bundled_volume().source,
                          "--max-dice-drop", "0.05", "--min-worst-dice", "0.8")
    assert code == 0, err
    assert "openvino encoder int8 + decoder fp32" in " ".join(out.split())


def test_build_refuses_a_changed_checkpoint(pipelines, ckpt, tmp_path):
    """Drift is measured against the model the bundle was exported from, or not at all."""
    bundle = tmp_path / "samed"
    shutil.copytree(pipelines["samed"][0], bundle)
    changed = tmp_path / "samed.pth"
    state = torch.load(ckpt["samed"], weights_only=True)
    torch.save({k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}, changed)
    manifest = _manifest(bundle)
    manifest["model"]["checkpoint"]["path"] = str(changed)
    write_manifest(bundle, manifest)  # a manifest rewritten by samedge, not a tampered one
    code, _, err = _run("build", bundle, "--backend", "onnxruntime", "--precision", "fp16")
    assert code == 2 and "changed since the bundle was exported" in " ".join(err.split())
    assert not _artifacts(bundle, "fp16")
