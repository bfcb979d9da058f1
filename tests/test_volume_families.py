"""Volume segmentation for the depth and semantic families, on synthetic checkpoints in their
upstream layouts (small ViT, image 128) and the real MR volume nibabel ships.

MA-SAM's label volume is checked against its upstream volume inference run on the FP32 PyTorch
model: one window of D slices centred on every slice (edges replicated), the softmax of every
window that covers a slice averaged, then argmax. Med-SA 3D encodes consecutive stacks of D.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import upstream_pipelines as up
import volume_data as vd

from samedge.cli import main
from samedge.data.bundled import bundled_volume
from samedge.data.open import open_volume
from samedge.export.bundle import write_manifest
from samedge.export.exporter import export_bundle
from samedge.models import build_model
from samedge.models.reference import TorchReference
from samedge.runtime import Predictor, VolumePredictor

MASAM_DEPTH, MEDSA_DEPTH, SLICES = 3, 4, 10


@pytest.fixture(scope="module")
def cards(small_checkpoints):
    paths = small_checkpoints
    return {
        "masam": build_model("masam", base=paths["base"], checkpoint=paths["masam"],
                             image_size=128, depth=MASAM_DEPTH),
        "medsa3d": build_model("medsa", checkpoint=paths["medsa3d"], depth=MEDSA_DEPTH),
        "samed": build_model("samed", base=paths["base"], checkpoint=paths["samed"],
                             image_size=128),
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, cards) -> dict[str, Path]:
    """ONNX Runtime bundles; depth models are validated on the bundled MR volume's stacks."""
    out = tmp_path_factory.mktemp("volume_bundles")
    image = bundled_volume()[12].image
    for name, card in cards.items():
        export_bundle(card, out / name, [image], backends=("onnxruntime",))
    return {name: out / name for name in cards}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """The first SLICES slices of nibabel's example4d (real MR, 96 x 128)."""
    volume = bundled_volume()
    return np.stack([volume[i].image for i in range(SLICES)])


def test_masam_label_volume_is_upstreams_window_average(bundles, cards, images):
    segmenter = VolumePredictor(Predictor(bundles["masam"], backend="onnxruntime", threads=2))
    segmenter.set_volume(images)
    got = segmenter.segment()
    assert segmenter.encoder_calls == SLICES  # one window per slice, each encoded once
    reference, card = TorchReference(cards["masam"]), cards["masam"]
    half, windows, error = MASAM_DEPTH // 2, [], 0.0
    for centre in range(SLICES):
        indices = [min(max(i, 0), SLICES - 1) for i in range(centre - half, centre - half +
                                                                MASAM_DEPTH)]
        reference.set_volume([images[i] for i in indices])
        windows.append(torch.from_numpy(reference.segment()["low_res_logits"]))
        segmenter.predictor.set_volume([images[i] for i in indices])
        got_low = segmenter.predictor.segment().low_res_logits
        error = max(error, float(np.abs(got_low - windows[-1].numpy()).max()))
    probability = up.masam_volume_probabilities(windows, 96, 128)
    want = probability.argmax(-1)
    assert got.labels.shape == (SLICES, 96, 128) and got.classes == card.num_mask_tokens
    up.assert_agree_where_decided(got.labels, want,
                                  up.decision_margin(np.moveaxis(probability, -1, 1)),
                                  up.graph_bound(error))
    assert np.unique(want).size > 1
    centre_only = []  # what predict gives: each slice from the one window centred on it
    for centre in range(SLICES):
        reference.set_volume([images[min(max(i, 0), SLICES - 1)]
                              for i in range(centre - half, centre - half + MASAM_DEPTH)])
        centre_only.append(reference.segment()["labels"][half])
    assert (np.stack(centre_only) != want).any()  # the averaging changes labels here


def test_medsa_3d_encodes_consecutive_stacks(bundles, images):
    predictor = Predictor(bundles["medsa3d"], backend="onnxruntime", threads=2)
    segmenter = VolumePredictor(predictor, overlap=False)
    segmenter.set_volume(images)
    result = segmenter.predict_point([(64, 48, 5)])
    decoded = result.decoded
    keys = {min((n // MEDSA_DEPTH) * MEDSA_DEPTH, SLICES - MEDSA_DEPTH) for n in decoded}
    assert segmenter.encoder_calls == len(keys) <= 3  # stacks 0..3, 4..7 and 6..9
    check = Predictor(bundles["medsa3d"], backend="onnxruntime", threads=2)
    check.set_volume(images[4:8])
    check.select_slice(1)
    want = check.predict(point_coords=[[48, 64]], point_labels=[1], multimask_output=False)
    assert (result.mask[5] == want.masks[0]).all()  # (row, col) clicks, slice 5 of stack 4..7


def test_semantic_cli_writes_label_volume_and_dicom_seg_with_class_names(bundles, tmp_path):
    bundle = tmp_path / "samed"
    shutil.copytree(bundles["samed"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [f"organ {i}" for i in range(1, 4)]
    manifest["model"]["class_names"] = names
    write_manifest(bundle, manifest)
    data, _ = vd.ellipsoid()
    source = vd.write_nifti(tmp_path / "ct.nii.gz", data, vd.affine("flipped"))
    series = vd.nifti_to_series(source, tmp_path / "series")
    outputs = {"seg.nii.gz": source, "seg.dcm": series}
    for out, volume in outputs.items():
        args = ["--modality", "CT"] if out.endswith(".gz") else []
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["--quiet", "--threads", "2", "segment", str(bundle), str(volume), *args,
                         "-o", str(tmp_path / out)])
        assert code == 0, stderr.getvalue()
        assert "[-125, 275] HU" in stdout.getvalue()
    labels = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert labels.shape == data.shape and np.unique(labels).size > 1
    predictor = Predictor(bundle, backend="onnxruntime")
    volume = open_volume(source, window=predictor.pre.ct_window, modality="CT")
    geometry = volume.geometry
    for n in (0, 4, 8):
        predictor.set_image(volume[n].image)
        assert (geometry.from_stored(labels)[n] == predictor.segment().labels[0]).all()
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [d.SegmentLabel for d in seg.SegmentSequence] == names
    dicom = open_volume(series).geometry
    for path in dicom.files:  # each frame on its own source instance, classes combined
        k = int(path.stem.split("_")[-1])  # the NIfTI k the instance was written from
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        frame = seg.get_pixels_by_source_instance(
            [uid], combine_segments=True, assert_missing_frames_are_empty=True)[0]
        assert (frame == labels[:, :, k].T).all(), path.name
