"""The CLI as a user runs it: predict on a real DICOM, info on a bundle, typed errors."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from samedge.cli import main
from samedge.data.bundled import bundled_slices


def _dicom(name):
    return next(s for s in bundled_slices() if s.name == name).source


def test_predict_writes_mask_and_overlay(litemedsam_bundle, tmp_path, capsys):
    prefix = tmp_path / "out" / "ct"
    code = main(["--quiet", "--threads", "2", "predict", str(litemedsam_bundle),
                 str(_dicom("CT_small.dcm")), "--box", "20,20,100,110", "-o", str(prefix)])
    assert code == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "ct.png"))
    overlay = np.asarray(Image.open(tmp_path / "out" / "ct_overlay.png"))
    assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255} and mask.any()
    assert overlay.shape == (128, 128, 3)
    assert not mask[:15].any()  # nothing far outside the box
    assert "predicted IoU" in capsys.readouterr().out
    assert pydicom.dcmread(_dicom("CT_small.dcm")).Rows == 128


def test_info_verifies_hashes(litemedsam_bundle, capsys):
    assert main(["info", str(litemedsam_bundle)]) == 0
    out = capsys.readouterr().out
    assert "all files match their sha256" in out and "decoder_sam" in out


@pytest.mark.parametrize("args, message", [
    (["--box", "0,0,500,20"], "outside"),
    (["--box", "1,2,3"], "cannot read box"),
    ([], "empty prompt"),
])
def test_predict_errors_exit_non_zero(litemedsam_bundle, tmp_path, capsys, args, message):
    code = main(["--quiet", "predict", str(litemedsam_bundle), str(_dicom("CT_small.dcm")),
                 "-o", str(tmp_path / "m"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("m*.png"))


def test_unreadable_image(litemedsam_bundle, tmp_path, capsys):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not a png")
    assert main(["--quiet", "predict", str(litemedsam_bundle), str(bad), "--box",
                 "0,0,5,5"]) == 2
    assert "error" in capsys.readouterr().err


def test_family_options_are_checked(capsys):
    assert main(["--quiet", "export", "--family", "samed"]) == 2
    assert "needs base, checkpoint" in capsys.readouterr().err
    assert main(["--quiet", "export", "--family", "litemedsam", "--num-classes", "3"]) == 2
    assert "does not take num_classes" in capsys.readouterr().err


# -- calibrate / build / validate ------------------------------------------------------------------
def _flat(text: str) -> str:
    """Console output without whitespace: rich wraps long lines at any width."""
    return "".join(text.split())


def _write_pngs(folder, count, size=(48, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(folder / f"s{i:02d}.png")
    return folder


def test_calibrate_build_validate_exit_codes(bundle_copy, tmp_path, capsys):
    """The issue's user story on the real LiteMedSAM bundle, kept small: a gate that fails exits
    1 and keeps the variant out, a passing variant is added, validate writes its report either
    way and exits 1 only when a gate fails."""
    import json

    from samedge.runtime import Bundle

    ct = str(_dicom("CT_small.dcm"))
    data = _write_pngs(tmp_path / "calib", 3)
    code = main(["--quiet", "--threads", "2", "calibrate", "--data", str(data), "--window",
                 "ct-abdomen", "--count", "2", "-o", str(bundle_copy)])
    out = capsys.readouterr().out
    assert code == 0 and "Calibrationsetrecorded" in _flat(out)
    spec = Bundle(bundle_copy).manifest["calibration"]
    assert spec["slices"] == 2 and spec["window"] == "abdomen"
    before = Bundle(bundle_copy).artifacts

    # a gate nothing can meet: exit 1, nothing added, the report says why
    code = main(["--quiet", "--threads", "2", "build", str(bundle_copy), "--backend",
                 "onnxruntime", "--precision", "int8", "--graphs", "decoder", "--search", "none",
                 "--validation-data", ct, "--no-layer-errors", "--max-dice-drop", "0",
                 "--min-worst-dice", "1.0"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "keptout" in _flat(captured.out) and "gatefailed" in _flat(captured.err)
    assert len(Bundle(bundle_copy).artifacts) == len(before)
    report = (bundle_copy / "report" / "report.html").read_text()
    assert "Variants kept out" in report and "decoder onnx int8" in report

    # mixed FP16 ONNX decoder passes its default gate: exit 0, added with its drift
    code = main(["--quiet", "--threads", "2", "build", str(bundle_copy), "--backend",
                 "onnxruntime", "--precision", "fp16", "--graphs", "decoder",
                 "--validation-data", ct])
    captured = capsys.readouterr()
    assert code == 0, captured.err + captured.out
    artifact = Bundle(bundle_copy).find("decoder", "onnxruntime", "fp16")
    assert artifact["validation"]["onnxruntime"]["gate"]["passed"]

    # validate: loosened gate passes (exit 0), an impossible one fails (exit 1); reports written
    report_dir = tmp_path / "validation"
    code = main(["--quiet", "--threads", "2", "validate", str(bundle_copy), "--data", ct,
                 "--max-dice-drop", "0.05", "--min-worst-dice", "0.8", "--report",
                 str(report_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err + captured.out
    assert "onnxruntime encoder fp32 + decoder fp16" in captured.out  # the FP16 decoder is measured
    assert _flat(f"report: {report_dir / 'report.html'}") in _flat(captured.out)
    run = json.loads((report_dir / "validation.json").read_text())
    assert run["passed"] is True
    assert run["variants"]["onnxruntime encoder fp32 + decoder fp16"]["gate"]["passed"]
    code = main(["--quiet", "--threads", "2", "validate", str(bundle_copy), "--data", ct,
                 "--max-dice-drop", "0", "--min-worst-dice", "1.0", "--min-embedding-cosine",
                 "1.0", "--report", str(report_dir)])
    captured = capsys.readouterr()
    assert code == 1 and "gatefailed" in _flat(captured.err)
    assert "FAIL" in captured.out
    assert json.loads((report_dir / "validation.json").read_text())["passed"] is False
    assert "Validation run: FAIL" in (report_dir / "report.html").read_text()


@pytest.mark.parametrize("make, args, message", [
    (lambda d: d.mkdir(), [], "empty"),
    (lambda d: None, [], "does not exist"),
    (lambda d: (d.mkdir(), (d / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")), [],
     "unusable"),
    (lambda d: _write_pngs(d, 2), ["--window", "ct-elbow"], "cannot parse intensity window"),
    (lambda d: _write_pngs(d, 2), ["--count", "0"], "count"),
])
def test_calibrate_bad_input_exits_2(bundle_copy, tmp_path, capsys, make, args, message):
    folder = tmp_path / "data"
    make(folder)
    before = (bundle_copy / "manifest.json").read_text()
    code = main(["--quiet", "calibrate", "--data", str(folder), *args, "-o", str(bundle_copy)])
    assert code == 2
    assert _flat(message) in _flat(capsys.readouterr().err)
    assert (bundle_copy / "manifest.json").read_text() == before  # nothing recorded


@pytest.mark.parametrize("args, message", [
    (["--data", "EMPTY"], "no slices"),
    (["--data", "CT", "--prompts", "boxes-from-masks"], "no mask or box"),
    (["--data", "CT", "--prompts", "missing.json"], "neither auto, boxes-from-masks nor a file"),
    (["--data", "CT", "--window", "elbow"], "cannot parse intensity window"),
    (["--data", "CT", "--min-worst-dice", "1.5"], "between 0 and 1"),
])
def test_validate_bad_input_exits_2(litemedsam_bundle, tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [{"EMPTY": str(empty), "CT": str(_dicom("CT_small.dcm"))}.get(a, a) for a in args]
    code = main(["--quiet", "validate", str(litemedsam_bundle), *args,
                 "--report", str(tmp_path / "report")])
    assert code == 2
    assert _flat(message) in _flat(capsys.readouterr().err)
    assert not (tmp_path / "report").exists()


def test_build_refuses_tensorrt_without_tensorrt_and_unknown_graphs(litemedsam_bundle, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    code = main(["--quiet", "build", str(litemedsam_bundle), "--backend", "tensorrt",
                 "--precision", "int8"])
    err = _flat(capsys.readouterr().err)
    assert code == 2
    assert _flat("cannot build TensorRT int8 engines here") in err
    assert "--backendonnxruntime" in err
    code = main(["--quiet", "build", str(litemedsam_bundle), "--backend", "openvino",
                 "--precision", "int8", "--graphs", "encoder,neck"])
    assert code == 2 and "unknowngraphneck" in _flat(capsys.readouterr().err)
