"""The CLI as a user runs it: predict on a real DICOM, info on a bundle, typed errors."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from samedge.cli import main
from samedge.calibration.sources import bundled_slices


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


def test_cli_family_names_match_registry():
    from samedge.cli import FAMILY_NAMES
    from samedge.models import FAMILIES

    assert sorted(FAMILY_NAMES) == sorted(FAMILIES)


def test_family_options_are_checked(capsys):
    assert main(["--quiet", "export", "--family", "samed"]) == 2
    assert "needs base, checkpoint" in capsys.readouterr().err
    assert main(["--quiet", "export", "--family", "litemedsam", "--num-classes", "3"]) == 2
    assert "does not take num_classes" in capsys.readouterr().err
