"""What a hostile but realistic user can type: tampered manifests, folders an export must not
delete, thousands of prompts, threads sharing a Predictor, out-of-range options, outputs named
like inputs. Each test failed before the change that made it pass (issue 13)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samedge.cli import main
from samedge.data.bundled import bundled_slices
from samedge.data.open import load_image
from samedge.data.prompts import auto_boxes
from samedge.errors import (
    BundleError,
    DataSourceError,
    ImageError,
    PromptError,
    UsageError,
)
from samedge.export import atomic
from samedge.export.bundle import BundleWriter, upgrade_bundle, write_manifest
from samedge.overlay import label_map, save_mask_outputs
from samedge.runtime import Bundle, Predictor
from samedge.runtime import predictor as predictor_module
from samedge.runtime.backends import available_cores, open_backend

BACKENDS = ("onnxruntime", "openvino")
SAM_MEAN, SAM_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _ct():
    return next(s for s in bundled_slices() if s.name == "CT_small.dcm")


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_raw(bundle: Path, manifest) -> None:
    """A hand edit: the manifest changes, its recorded hash does not."""
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _artifact(manifest: dict, graph: str, fmt: str, precision: str = "fp32") -> dict:
    return next(a for a in manifest["artifacts"]
                if (a["graph"], a["format"], a["precision"]) == (graph, fmt, precision))


# -- item 3: the manifest is verified ------------------------------------------------------------
def _sam_preprocessing(bundle: Path, tmp_path: Path) -> None:
    manifest = _manifest(bundle)
    manifest["preprocessing"].update(normalize="mean_std", pixel_mean=SAM_MEAN, pixel_std=SAM_STD)
    _write_raw(bundle, manifest)


def _entry_outside(bundle: Path, tmp_path: Path) -> None:
    """A tamperer who even recomputes the manifest hash: the entry points out of the bundle."""
    evil = tmp_path / "evil"
    evil.mkdir()
    manifest = _manifest(bundle)
    artifact = _artifact(manifest, "encoder", "openvino_ir")
    files = {}
    for suffix in (".xml", ".bin"):
        shutil.copy(bundle / "openvino" / f"encoder_fp32{suffix}", evil / f"encoder_int8{suffix}")
        files[f"../evil/encoder_int8{suffix}"] = hashlib.sha256(
            (evil / f"encoder_int8{suffix}").read_bytes()).hexdigest()
    artifact.update(entry="../evil/encoder_int8.xml", files=files)
    write_manifest(bundle, manifest)


def _passwd(bundle: Path, tmp_path: Path) -> None:
    manifest = _manifest(bundle)
    target = Path("/etc/passwd")
    _artifact(manifest, "decoder", "onnx")["files"]["../../../../etc/passwd"] = \
        hashlib.sha256(target.read_bytes()).hexdigest()
    write_manifest(bundle, manifest)


def _symlink_out(bundle: Path, tmp_path: Path) -> None:
    """A listed file that is a symlink leading out of the bundle (hash matching its target)."""
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "decoder.onnx", outside)
    (bundle / "decoder.onnx").unlink()
    (bundle / "decoder.onnx").symlink_to(outside)


def _bogus_normalize(bundle: Path, tmp_path: Path) -> None:
    manifest = _manifest(bundle)
    manifest["preprocessing"]["normalize"] = "bogus"
    write_manifest(bundle, manifest)


TAMPERING = {
    "edited preprocessing": (_sam_preprocessing, "was modified after it was written"),
    "entry outside the bundle": (_entry_outside, "not a file inside the bundle"),
    "/etc/passwd listed": (_passwd, "not a file inside the bundle"),
    "symlink out of the bundle": (_symlink_out, "not a file inside the bundle"),
    "bogus normalize": (_bogus_normalize, "manifest.preprocessing.normalize"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_manifests_are_refused_by_info_and_predict(bundle_copy, tmp_path, capsys, case):
    tamper, message = TAMPERING[case]
    tamper(bundle_copy, tmp_path)
    with pytest.raises(BundleError, match=message):
        Bundle(bundle_copy)
    assert main(["info", str(bundle_copy)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    out = tmp_path / "mask"
    assert main(["--quiet", "predict", str(bundle_copy), str(_ct().source), "--box",
                 "20,20,100,110", "--backend", "openvino", "-o", str(out)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not list(tmp_path.glob("mask*.png"))


@pytest.mark.parametrize("change, where", [
    (lambda m: m["artifacts"][0].pop("files"), "manifest.artifacts[0]: 'files' is a required"),
    (lambda m: m["preprocessing"].update(pixel_std=[0.0, 1.0, 1.0]),
     "manifest.preprocessing.pixel_std[0]"),
    (lambda m: m["preprocessing"].update(image_size="256"), "manifest.preprocessing.image_size"),
    (lambda m: m["model"].pop("depth"), "manifest.model: 'depth' is a required"),
    (lambda m: m["preprocessing"].update(extra=1), "manifest.preprocessing"),
    (lambda m: m["artifacts"][0].update(graph="nope"), "manifest.artifacts[0].graph"),
    (lambda m: m.update(default_variant={"backend": "foo"}), "manifest.default_variant.backend"),
    (lambda m: m["graphs"]["encoder"].update(inputs=[]), "manifest.graphs.encoder.inputs"),
])
def test_malformed_manifest_is_a_typed_error_naming_the_field(bundle_copy, change, where):
    manifest = _manifest(bundle_copy)
    change(manifest)
    write_manifest(bundle_copy, manifest)  # well sealed, badly shaped
    with pytest.raises(BundleError, match="malformed") as caught:
        Bundle(bundle_copy, verify=False)
    assert where in str(caught.value)


def test_sizes_that_disagree_are_refused(bundle_copy):
    """An image size edited in the preprocessing alone (sealed again) used to reach OpenVINO as a
    shape error."""
    manifest = _manifest(bundle_copy)
    manifest["preprocessing"]["image_size"] = 512
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match="manifest.model.image_size is 256"):
        Bundle(bundle_copy, verify=False)


@pytest.mark.parametrize("text", ["[1, 2]", '"samedge"', "{}", '{"format": "samedge-bundle"}'])
def test_manifest_that_is_no_object_or_no_samedge_manifest(bundle_copy, text):
    (bundle_copy / "manifest.json").write_text(text)
    with pytest.raises(BundleError):
        Bundle(bundle_copy, verify=False)


def test_openvino_weights_must_be_hashed_with_their_xml(bundle_copy):
    """OpenVINO reads NAME.bin beside NAME.xml by name alone: an artifact that does not hash it
    would let the weights be swapped."""
    manifest = _manifest(bundle_copy)
    del _artifact(manifest, "decoder", "openvino_ir")["files"]["openvino/decoder_fp32.bin"]
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match="decoder_fp32.xml is not hashed"):
        Bundle(bundle_copy, verify=False)


def test_manifest_hash_ignores_layout_but_not_values(bundle_copy):
    manifest = _manifest(bundle_copy)
    (bundle_copy / "manifest.json").write_text(json.dumps(dict(reversed(manifest.items()))))
    Bundle(bundle_copy, verify=False)  # key order and whitespace are not content
    manifest["model"]["multimask_default"] = True
    _write_raw(bundle_copy, manifest)
    with pytest.raises(BundleError, match="modified"):
        Bundle(bundle_copy, verify=False)


def test_format_1_bundle_gets_a_clear_message_and_an_explicit_upgrade(bundle_copy, capsys):
    manifest = _manifest(bundle_copy)
    manifest.pop("manifest_sha256")
    manifest["format_version"] = 1
    _write_raw(bundle_copy, manifest)
    with pytest.raises(BundleError, match="format 1") as caught:
        Bundle(bundle_copy)
    assert "--upgrade" in caught.value.hint
    assert main(["info", str(bundle_copy), "--upgrade"]) == 0
    assert "manifest sealed" in capsys.readouterr().out
    assert Bundle(bundle_copy).manifest["format_version"] == 2


def test_upgrade_refuses_a_format_1_bundle_with_a_changed_file(bundle_copy):
    manifest = _manifest(bundle_copy)
    manifest.pop("manifest_sha256")
    manifest["format_version"] = 1
    _write_raw(bundle_copy, manifest)
    with open(bundle_copy / "decoder.onnx", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\0" * 8)
    with pytest.raises(BundleError, match="decoder.onnx does not match"):
        upgrade_bundle(bundle_copy)
    assert _manifest(bundle_copy)["format_version"] == 1  # left as it was


# -- item 4: exports never delete what they did not write ---------------------------------------
def _no_model(monkeypatch):
    import samedge.models
    import samedge.pipeline.run  # imported now, so it never keeps the stand-in below

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the output folder was checked")

    monkeypatch.setattr(samedge.models, "build_model", refuse)
    monkeypatch.setattr(samedge.pipeline.run, "build_model", refuse)


def test_export_refuses_a_folder_with_a_foreign_manifest_before_building(tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "study"
    (out / "scans").mkdir(parents=True)
    (out / "manifest.json").write_text('{"study": "liver", "files": 12}')
    (out / "results.csv").write_text("patient,volume\n1,1200\n")
    (out / "scans" / "a.dcm").write_bytes(b"DICM")
    _no_model(monkeypatch)
    assert main(["--quiet", "export", "-o", str(out)]) == 2
    assert "not a samedge bundle" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == \
        ["manifest.json", "results.csv", "scans", "scans/a.dcm"]


def test_export_refuses_a_bundle_holding_a_users_files(bundle_copy, tmp_path, monkeypatch,
                                                       capsys):
    (bundle_copy / "notes.csv").write_text("my notes")
    _no_model(monkeypatch)
    assert main(["--quiet", "export", "-o", str(bundle_copy)]) == 2
    assert "notes.csv" in capsys.readouterr().err
    assert (bundle_copy / "notes.csv").read_text() == "my notes"


def test_bundles_own_report_folder_does_not_block_a_rebuild(bundle_copy):
    (bundle_copy / "report").mkdir()
    (bundle_copy / "report" / "report.md").write_text("# drift")
    atomic.check_target(bundle_copy)


def test_replacing_a_bundle_is_one_atomic_exchange(tmp_path, monkeypatch):
    target, staging = tmp_path / "bundle", tmp_path / ".bundle.staging-1"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    staging.mkdir()
    (staging / "manifest.json").write_text("new")
    inode = staging.stat().st_ino
    synced = []
    monkeypatch.setattr(atomic, "fsync_dir", synced.append)

    def no_two_step(*args):
        raise AssertionError("target replaced in two renames")

    monkeypatch.setattr(atomic.os, "replace", no_two_step)
    atomic.swap_in(staging, target)
    assert (target / "manifest.json").read_text() == "new"
    assert target.stat().st_ino == inode  # the staged folder itself, swapped in
    assert not staging.exists()
    assert synced == [tmp_path]


def test_stale_staging_of_dead_exports_is_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".bundle.staging-{dead.pid}"
    old = tmp_path / f".bundle.old-{dead.pid}"
    live = tmp_path / f".bundle.staging-{os.getppid()}"
    other = tmp_path / f".other.staging-{dead.pid}"
    for folder in (stale, old, live, other):
        (folder / "openvino").mkdir(parents=True)
        (folder / "openvino" / "encoder_fp32.bin").write_bytes(b"x" * 1000)
    with BundleWriter(tmp_path / "bundle") as writer:
        assert writer.staging.is_dir()
    assert not stale.exists() and not old.exists()
    assert live.exists() and other.exists()  # a running export's, and another bundle's


# -- item 1: memory bounded for any prompt count -------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_calls_are_chunked_by_memory_and_results_unchanged(litemedsam_bundle, backend,
                                                                   monkeypatch):
    predictor = Predictor(litemedsam_bundle, backend=backend, threads=2)
    image = _ct().image
    predictor.set_image(image)
    boxes = np.tile(auto_boxes(image), (8, 1))  # 40 boxes
    sizes = []
    run = predictor.decoder.run

    def spy(feed):
        sizes.append(len(feed["point_coords"]))
        return run(feed)

    monkeypatch.setattr(predictor.decoder, "run", spy)
    chunked = predictor.predict(boxes=boxes, return_logits=True)
    step = predictor._chunk(predictor.image_embedding, predictor.frame, len(boxes))
    assert max(sizes) == step < len(boxes) and sum(sizes) == len(boxes)
    embedding_mib = predictor.image_embedding.nbytes / 2**20
    assert step * predictor_module.DECODER_WORK_PER_EMBEDDING * embedding_mib <= 256
    monkeypatch.setattr(predictor_module, "DECODE_MEMORY", 2**40)
    monkeypatch.setattr(predictor.decoder, "decode_batch", None, raising=False)
    whole = predictor.predict(boxes=boxes, return_logits=True)
    np.testing.assert_allclose(chunked.masks, whole.masks, atol=1e-4)
    np.testing.assert_allclose(chunked.scores, whole.scores, atol=1e-5)


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from samedge.runtime import Predictor
    bundle, backend, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    predictor = Predictor(bundle, backend=backend, threads=2)
    rng = np.random.default_rng(0)
    predictor.set_image(rng.integers(0, 255, (size, size), dtype=np.uint8))
    predictor.predict(boxes=np.array([[10, 10, 90, 90]] * 6))  # warm: plans, arenas
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    corner = rng.uniform(0, size / 2, (count, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(4, size / 2, (count, 2))], axis=1)
    result = predictor.predict(boxes=boxes)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(grown, result.masks.nbytes + result.low_res_logits.nbytes)
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_grows_by_the_result_not_the_prompt_count(litemedsam_bundle, backend):
    """300 boxes on a 128² slice: before, OpenVINO decoded them in one call (~35 MiB per box,
    10 GB) and ONNX Runtime kept every call's four-token outputs twice (~3 MiB per box)."""
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(litemedsam_bundle), backend,
                          "300", "128"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    grown, result = map(int, run.stdout.split())
    bound = result + predictor_module.DECODE_MEMORY + 64 * 2**20  # + allocator slack
    assert grown < bound, f"{backend}: peak grew {grown / 2**20:.0f} MiB"


def test_label_maps_hold_any_class_count(tmp_path):
    """More than 255 boxes used to end in OverflowError after the whole decode."""
    masks = np.zeros((300, 40, 40), bool)
    for index in range(300):
        masks[index].flat[index * 5 : index * 5 + 5] = True
    labels = label_map(masks)
    assert labels.dtype == np.uint16 and labels.max() == 300
    image = np.zeros((40, 40, 3), np.uint8)
    mask_png, overlay_png = save_mask_outputs(image, masks, tmp_path / "many")
    np.testing.assert_array_equal(np.asarray(Image.open(mask_png)), labels)
    assert np.asarray(Image.open(overlay_png)).shape == (40, 40, 3)
    with pytest.raises(PromptError, match="65535"):
        label_map(np.zeros((70000, 1, 1), bool))


# -- item 7: threads sharing one Predictor -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_sharing_a_predictor_each_get_their_own_images_answer(litemedsam_bundle,
                                                                      real_slices, backend):
    """A web server's handlers: set_image then predict in each thread. Before, OpenVINO raised
    "Infer Request is busy" and ONNX Runtime decoded against whichever image was set last."""
    predictor = Predictor(litemedsam_bundle, backend=backend, threads=1)
    images = [s.image for s in real_slices[:4]]
    expected = []
    for image in images:
        predictor.set_image(image)
        expected.append(predictor.predict(boxes=auto_boxes(image), return_logits=True))
    results, errors = {}, []
    barrier = threading.Barrier(8)

    def handler(index):
        try:
            image = images[index % 4]
            barrier.wait()
            predictor.set_image(image)
            results[index] = predictor.predict(boxes=auto_boxes(image), return_logits=True)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=handler, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, result in results.items():
        want = expected[index % 4]
        np.testing.assert_allclose(result.low_res_logits, want.low_res_logits, atol=1e-4)
        assert result.masks.shape == want.masks.shape
    sink = []  # a thread that set no image gets a typed error, not another thread's image
    thread = threading.Thread(target=_expect_no_image, args=(predictor, sink))
    thread.start()
    thread.join()
    assert len(sink) == 1 and "own current image" in str(sink[0])


def _expect_no_image(predictor, sink):
    try:
        predictor.predict(boxes=[0, 0, 5, 5])
    except PromptError as exc:
        sink.append(exc)


# -- item 6: thread counts -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [0, -1, 100000])
def test_thread_counts_outside_the_machine_are_refused(litemedsam_bundle, backend, threads):
    with pytest.raises(UsageError, match=f"1 to {available_cores()}"):
        open_backend(backend, litemedsam_bundle / "decoder.onnx", threads)


def test_cli_threads_checked_first(litemedsam_bundle, tmp_path, capsys):
    assert main(["--threads", "100000", "predict", str(litemedsam_bundle), str(_ct().source),
                 "--box", "20,20,100,110", "-o", str(tmp_path / "m")]) == 2
    assert "1 to" in capsys.readouterr().err


# -- item 5: outputs never overwrite inputs ------------------------------------------------------
def test_predict_output_named_like_the_input_is_refused(litemedsam_bundle, tmp_path, capsys):
    scan = tmp_path / "scan.png"
    Image.fromarray(_ct().image).save(scan)
    before = scan.read_bytes()
    assert main(["--quiet", "predict", str(litemedsam_bundle), str(scan), "--box",
                 "20,20,100,110", "-o", str(tmp_path / "scan")]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert scan.read_bytes() == before


# -- item 8: prompts, messages, inputs -----------------------------------------------------------
def test_degenerate_prompts_are_refused(litemedsam_bundle):
    predictor = Predictor(litemedsam_bundle, threads=2)
    predictor.set_image(_ct().image)
    with pytest.raises(PromptError, match="zero width or height"):
        predictor.predict(boxes=[20, 20, 20, 90])
    with pytest.raises(PromptError, match="only padding points"):
        predictor.predict(point_coords=[[30, 30]], point_labels=[-1])
    padded = predictor.predict(point_coords=[[[30, 30], [0, 0]]], point_labels=[[1, -1]])
    assert padded.masks.shape[0] == 1  # padding beside a real click stays legal (SAM's ONNX)


@pytest.mark.parametrize("args, message", [
    (["--box", "-10,5,60,70"], "outside the 128x128 image"),  # argparse used to reject it
    (["--point", "30,30,-1"], "point labels must be 1"),
    (["--box", "20,20,20,90"], "zero width or height"),
    (["--box", "20,20,100,110", "--backend", "foo"], "unknown backend 'foo'"),
])
def test_cli_prompt_errors_come_before_the_encoder(litemedsam_bundle, tmp_path, capsys,
                                                   monkeypatch, args, message):
    def no_encoder(self, *a, **k):
        raise AssertionError("the image was encoded before the prompts were checked")

    monkeypatch.setattr(Predictor, "set_image", no_encoder)
    assert main(["--quiet", "predict", str(litemedsam_bundle), str(_ct().source),
                 "-o", str(tmp_path / "m"), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_prompts_are_checked_before_any_model_loads(litemedsam_bundle, tmp_path, capsys,
                                                         monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a backend was opened before the prompts were checked")

    monkeypatch.setattr(predictor_module, "open_backend", no_model)
    assert main(["--quiet", "predict", str(litemedsam_bundle), str(_ct().source),
                 "--box", "0,0,500,20", "-o", str(tmp_path / "m")]) == 2
    assert "outside" in capsys.readouterr().err


def test_4d_nifti_needs_a_frame(litemedsam_bundle, tmp_path, capsys):
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    with pytest.raises(DataSourceError, match="4-D"):
        load_image(path, frame=None)
    assert main(["--quiet", "predict", str(litemedsam_bundle), str(path), "--box",
                 "10,10,60,60", "-o", str(tmp_path / "m")]) == 2
    assert "--frame" in capsys.readouterr().err
    assert main(["--quiet", "predict", str(litemedsam_bundle), str(path), "--frame", "1",
                 "--box", "10,10,60,60", "-o", str(tmp_path / "m")]) == 0


def test_truncated_uncompressed_dicom_says_truncated(tmp_path):
    source = _ct().source
    data = source.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 4000])
    with pytest.raises(ImageError) as caught:
        load_image(cut)
    assert "truncated" in str(caught.value) and "pip install" not in str(caught.value)

