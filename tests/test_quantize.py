"""Calibration, quantization, drift gate and report: on real LiteMedSAM graphs, small subsets.

The decoder stands in for the encoder where a test only needs *a* real graph (its Q/DQ and FP16
conversions take seconds, the encoder's a minute); the encoder runs in the slow tests.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from drift_fakes import fake_drift  # tests/ is on sys.path
from PIL import Image

from samedge.data import sampling
from samedge.data.prompts import PromptPolicy
from samedge.data.slices import Slice
from samedge.errors import DataSourceError, ImageError, PromptError, SamedgeError
from samedge.quantize.calibset import CalibrationSet
from samedge.quantize.fp16 import convert_fp16
from samedge.quantize.layer_errors import onnx_layer_errors
from samedge.quantize.onnx_qdq import (
    OnnxMixed,
    calibrate_onnx,
    qdq_report,
    quantize_qdq,
)
from samedge.quantize.search import SearchResult, accuracy_search
from samedge.runtime import Bundle
from samedge.runtime.backends import open_backend
from samedge.runtime.transforms import Preprocessing, preprocess
from samedge.validation.gate import DEFAULT_GATES, Gate, GateSet
from samedge.validation.report import WorstCase, write_report

PRE = Preprocessing(image_size=256)


# -- gate --------------------------------------------------------------------------------------
def summary(mean, worst, prompts=45):
    return {"prompts": prompts, "dice_mean": mean, "dice_min": worst,
            "worst": [{"slice": "ct.dcm", "prompt": "box 3", "dice": worst}]}


def test_gate_defaults_and_reasons():
    int8, fp16 = DEFAULT_GATES["int8"], DEFAULT_GATES["fp16"]
    assert (int8.max_mean_dice_drop, int8.min_worst_dice) == (0.01, 0.90)
    assert (fp16.max_mean_dice_drop, fp16.min_worst_dice) == (0.002, 0.98)
    assert int8.evaluate(summary(0.995, 0.93)).passed
    failed = int8.evaluate(summary(0.985, 0.85))
    assert not failed.passed and len(failed.reasons) == 2
    assert "drop 0.0150 > 0.0100" in failed.reasons[0]
    assert "ct.dcm, box 3" in failed.reasons[1]
    assert not fp16.evaluate(summary(0.997, 0.99)).passed  # drop 0.003 > 0.002
    assert not int8.evaluate(summary(1.0, 1.0, prompts=0)).passed
    with pytest.raises(Exception):
        failed.raise_if_failed("encoder int8")


def test_gate_overrides_and_combined_score():
    gates = GateSet().override("int8", max_mean_dice_drop=0.05, min_worst_dice=0.5)
    assert gates.for_precision("int8").evaluate(summary(0.96, 0.6)).passed
    assert gates.for_precision("fp16") == DEFAULT_GATES["fp16"]  # others untouched
    assert gates.for_precision("int8-mixed").max_mean_dice_drop == 0.05
    gate = Gate(0.01, 0.95)
    rng = np.random.default_rng(0)
    for mean, worst in rng.uniform(0.9, 1.0, (200, 2)):
        worst = min(worst, mean)
        ok = gate.evaluate(summary(mean, worst)).passed
        assert ok == (gate.score(mean, worst) >= gate.min_mean_dice - 1e-12)


# -- calibration set ---------------------------------------------------------------------------
def write_pngs(folder: Path, count: int, size=(48, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random(size) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"slice_{i:03d}.png")
    return folder


def test_calibration_reads_one_slice_at_a_time(tmp_path, monkeypatch):
    folder = write_pngs(tmp_path / "pngs", 60)
    reads = []
    real = sampling.read_image_file

    def counting(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sampling, "read_image_file", counting)
    calib = CalibrationSet([folder], count=60, augment=False)
    assert reads == []  # opening reads no pixels
    feeds = calib.encoder_inputs(PRE)
    stream = iter(feeds)
    first = next(stream)
    assert first["image"].shape == (1, 3, 256, 256) and len(reads) == 1
    next(stream), next(stream)
    assert len(reads) == 3
    # the tensor is the runtime's own preprocessing of that slice
    image = np.asarray(Image.open(folder / reads[0]))
    np.testing.assert_array_equal(first["image"], preprocess(image, PRE)[0])
    # a full pass keeps memory flat: far below 60 slices' tensors (60 × 0.75 MiB)
    tracemalloc.start()
    for _ in feeds:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 12 * 2**20
    assert len(reads) == 3 + 60  # every pass re-reads: nothing is cached


def test_calibration_bad_inputs_raise_typed_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="empty"):
        CalibrationSet([empty], count=4)
    with pytest.raises(DataSourceError, match="does not exist"):
        CalibrationSet([tmp_path / "missing"], count=4)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    with pytest.raises(DataSourceError):
        CalibrationSet([junk], count=4)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    calib = CalibrationSet([broken], count=1)
    with pytest.raises(DataSourceError, match="unusable"):
        next(iter(calib.encoder_inputs(PRE)))
    four_d = tmp_path / "vol.npz"
    np.savez(four_d, image=np.zeros((2, 3, 8, 8)))
    with pytest.raises(DataSourceError):
        next(CalibrationSet([four_d], count=1).iter_slices())
    with pytest.raises(ImageError):
        preprocess(np.zeros((2, 4, 8, 8), np.float32), PRE)  # a volume where a slice belongs
    with pytest.raises(ImageError):
        Slice(np.zeros((8, 8), np.uint8), "grey-2d")  # slices are (H, W, 3)


def test_prompts_outside_the_image_are_refused(tmp_path):
    image = np.zeros((40, 50, 3), np.uint8)
    image[10:30, 10:40] = 200
    inside = Slice(image, "ok", box=np.array([5, 5, 45, 35], float))
    assert PromptPolicy("boxes-from-masks").boxes(inside).shape == (1, 4)
    outside = Slice(image, "bad", box=np.array([5, 5, 60, 35], float))
    with pytest.raises(PromptError, match="outside"):
        PromptPolicy("boxes-from-masks").boxes(outside)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"ok": [[0, 0, 10, 10]], "bad": [[-3, 0, 10, 10]]}))
    policy = PromptPolicy("file", prompts_file=prompts)
    assert policy.boxes(inside).tolist() == [[0, 0, 10, 10]]
    with pytest.raises(PromptError, match="outside"):
        policy.boxes(Slice(image, "bad"))
    with pytest.raises(PromptError, match="no mask or box"):
        PromptPolicy("boxes-from-masks").boxes(Slice(image, "unlabelled"))
    masked = Slice(image, "masked", mask=(image[..., 0] > 0).astype(np.uint8))
    np.testing.assert_array_equal(PromptPolicy("boxes-from-masks").boxes(masked),
                                  [[10, 10, 40, 30]])


def test_decoder_feeds_use_real_embeddings_and_runtime_transforms(real_slices):
    calls = []

    def encode(tensor):
        calls.append(tensor.shape)
        return np.zeros((1, 256, 64, 64), np.float32)

    calib = CalibrationSet(slices=real_slices[:2], count=2, augment=False)
    feeds = list(calib.decoder_inputs(PRE, encode, PromptPolicy(clicks=True)))
    assert calls == [(1, 3, 256, 256)] * 2 and len(feeds) == 4
    boxes, clicks = feeds[0], feeds[1]
    assert boxes["point_labels"][0].tolist() == [2, 3]
    assert clicks["point_labels"][0].tolist() == [1, -1]
    assert boxes["point_coords"].max() <= 256 and boxes["mask_input"].shape[1:] == (1, 256, 256)


# -- accuracy search (logic) -------------------------------------------------------------------
def test_accuracy_search_finds_fewest_float_ops():
    rng = np.random.default_rng(3)
    units = [f"op{i}" for i in range(40)]
    errors = dict(zip(units, rng.uniform(0, 1, 40) ** 4))  # a few ops dominate

    def measure(int8):
        total = sum(errors[u] for u in int8)
        return {"dice_mean": 1 - total / 20, "dice_min": 1 - total / 5}

    def passes(s):
        return s["dice_mean"] >= 0.99 and s["dice_min"] >= 0.95

    model, result = accuracy_search(units, lambda keep: list(keep), measure, passes, errors)
    assert result.passed and passes(measure(result.int8_units))
    k = len(result.float_units)
    shorter = sorted(units, key=lambda u: -errors[u])[k - 1:]
    assert not passes(measure(shorter))  # one op fewer in float would fail
    assert len(result.steps) <= 10
    assert isinstance(result, SearchResult) and result.describe()["float_units"]

    _, hopeless = accuracy_search(units, list, lambda keep: {"dice_mean": 0.5, "dice_min": 0.1},
                                  passes, errors, max_evaluations=4)
    assert not hopeless.passed


def test_accuracy_search_ranks_only_when_everything_reduced_fails():
    """Ranking costs one evaluation per unit: it runs only after the all-reduced model fails,
    and the bisection then follows it exactly as with a ranking given up front."""
    units = [f"op{i}" for i in range(40)]
    errors = dict(zip(units, np.random.default_rng(3).uniform(0, 1, 40) ** 4))
    calls = []

    def rank():
        calls.append(1)
        return errors

    def measure(int8, scale=20.0):
        total = sum(errors[u] for u in int8)
        return {"dice_mean": 1 - total / scale, "dice_min": 1 - total / scale}

    def passes(s):
        return s["dice_mean"] >= 0.99

    _, lenient = accuracy_search(units, list, lambda m: measure(m, 1e6), passes, rank)
    assert lenient.passed and not lenient.float_units and not calls
    assert len(lenient.steps) == 1 and lenient.sensitivity == {}
    assert lenient.ranking_seconds == 0.0
    _, ranked = accuracy_search(units, list, measure, passes, rank)
    _, given = accuracy_search(units, list, measure, passes, errors)
    assert calls == [1] and ranked.float_units == given.float_units
    assert ranked.ranking_seconds > 0.0 and ranked.sensitivity == errors
    assert [s.float_units for s in ranked.steps] == [s.float_units for s in given.steps]


def _search_with_clock(seconds_of):
    """The search above with a deterministic clock: ``seconds_of(int8 units)`` per round
    (alternate rounds 1 % slower, as load would make them); ``None``: no timing."""
    rng = np.random.default_rng(3)
    units = [f"op{i}" for i in range(40)]
    errors = dict(zip(units, rng.uniform(0, 1, 40) ** 4))

    def measure(int8):
        total = sum(errors[u] for u in int8)
        return {"dice_mean": 1 - total / 20, "dice_min": 1 - total / 5}

    def time_rounds(models, rounds, first):
        return [[seconds_of(len(m)) * (1 + 0.01 * (r % 2)) for r in range(rounds)]
                for m in models]

    return accuracy_search(units, lambda keep: list(keep), measure,
                           lambda s: s["dice_mean"] >= 0.99 and s["dice_min"] >= 0.95, errors,
                           time_rounds=time_rounds if seconds_of else None)


def test_speed_aware_search_keeps_more_float_when_int8_is_not_clearly_faster():
    """AVX2-like: INT8 units save 0.1 % each; the most precise passing split stays."""
    fewest = accuracy_search_fewest()
    _, result = _search_with_clock(lambda int8: 0.999 ** int8)
    passing = sorted(s.float_units for s in result.steps if s.passed)
    assert result.passed and result.speed["timed"]
    assert len(result.float_units) == max(passing[:4]) > fewest
    assert result.speed["fewest_float"] == fewest and result.describe()["speed"]


def test_speed_aware_search_takes_a_split_that_is_clearly_faster():
    """VNNI/AMX-like: each INT8 unit saves 7 %; the fewest-float split is clearly fastest."""
    fewest = accuracy_search_fewest()
    _, result = _search_with_clock(lambda int8: 0.93 ** int8)
    assert len(result.float_units) == fewest == result.speed["chosen_float"]
    assert all(c["verdict"] == "faster" for c in result.speed["comparisons"])


def test_speed_aware_search_avoids_int8_units_that_slow_it_down():
    """INT8 that costs (reorders around a lone INT8 unit): the split with more float wins even
    though fewer float units pass."""
    fewest = accuracy_search_fewest()
    _, result = _search_with_clock(lambda int8: 1.0 + 0.05 * int8)
    assert len(result.float_units) > fewest and result.speed["fewest_float"] == fewest


def accuracy_search_fewest() -> int:
    """Float units of the same search without timing (the accuracy-only answer)."""
    return len(_search_with_clock(None)[1].float_units)


# -- Q/DQ and FP16 ONNX on the real decoder ---------------------------------------------------
@pytest.fixture(scope="module")
def decoder_feeds(litemedsam_bundle, real_slices):
    bundle = Bundle(litemedsam_bundle)
    encoder = open_backend("onnxruntime", bundle.path / "encoder.onnx", 2)
    calib = CalibrationSet(slices=[s for s in real_slices if s.name in
                                   ("CT_small.dcm", "examples_overlay.dcm")], augment=False)
    return list(calib.decoder_inputs(
        bundle.preprocessing, lambda t: encoder.run({"image": t})["image_embeddings"]))


def test_qdq_onnx_is_symmetric_int8_and_runs_on_onnxruntime(litemedsam_bundle, decoder_feeds,
                                                             tmp_path):
    source = litemedsam_bundle / "decoder.onnx"
    calibration = calibrate_onnx(source, decoder_feeds, tmp_path / "ranges.json")
    assert calibration.slices == len(decoder_feeds)
    out = quantize_qdq(source, tmp_path / "decoder_int8.onnx", calibration)
    facts = qdq_report(out)
    assert facts["symmetric_int8"] and facts["zero_point_dtypes"] == ["int8"]
    assert facts["zero_point_max_abs"] == 0 and facts["dequantize_linear"] > 0
    model = onnx.load(str(out))
    kinds = {n.name: n.op_type for n in model.graph.node}
    assert {kinds[n] for n in facts["quantized_nodes"]} <= {"Conv", "Gemm", "MatMul",
                                                            "ConvTranspose"}
    fp32 = open_backend("onnxruntime", source, 2)
    int8 = open_backend("onnxruntime", out, 2)
    feed = decoder_feeds[0]
    want, got = fp32.run(feed), int8.run(feed)
    assert got["low_res_masks"].shape == want["low_res_masks"].shape
    assert np.isfinite(got["low_res_masks"]).all()
    # the mixed graph: reverting every op restores FP32 exactly, keeping all equals the Q/DQ graph
    mixed = OnnxMixed(source, out)
    none = tmp_path / "none.onnx"
    onnx.save(mixed.realize([]), str(none))
    np.testing.assert_allclose(open_backend("onnxruntime", none, 2).run(feed)["low_res_masks"],
                               want["low_res_masks"], atol=1e-4, rtol=1e-4)
    errors = onnx_layer_errors(source, out, decoder_feeds[:1])
    assert errors and all(e.rel_err >= 0 for e in errors)
    # excluding the ops the search names keeps them float in the tool's own output
    some = mixed.units[:3]
    partial = qdq_report(quantize_qdq(source, tmp_path / "partial.onnx", calibration,
                                      exclude=some))
    assert not set(some) & set(partial["quantized_nodes"])


def test_fp16_onnx_keeps_norms_softmax_and_residuals_fp32(litemedsam_bundle, decoder_feeds,
                                                          tmp_path):
    source = litemedsam_bundle / "decoder.onnx"
    conversion = convert_fp16(source, tmp_path / "decoder_fp16.onnx", decoder_feeds[:1])
    model = onnx.load(str(conversion.path))
    fp16_inits = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert fp16_inits > 20
    kinds = {n.name: n.op_type for n in onnx.load(str(source)).graph.node}
    kept = {kinds[n] for n in conversion.kept_fp32 if n in kinds}
    assert {"LayerNormalization", "Softmax", "Add"} <= kept
    assert "residual add" in conversion.reasons.values()
    assert [i.type.tensor_type.elem_type for i in model.graph.input][0] == onnx.TensorProto.FLOAT
    fp32 = open_backend("onnxruntime", source, 2).run(decoder_feeds[0])["low_res_masks"]
    half = open_backend("onnxruntime", conversion.path, 2).run(decoder_feeds[0])["low_res_masks"]
    assert np.linalg.norm(half - fp32) / np.linalg.norm(fp32) < 1e-2


# -- report ------------------------------------------------------------------------------------
def fake_manifest() -> dict:
    rng = np.random.default_rng(0)

    def entry(mean_loss, gate):
        dice = np.clip(1 - rng.exponential(mean_loss, 20), 0, 1)
        per_prompt = [{"slice": f"s{i // 5}", "prompt": f"box {i % 5}", "dice": float(d)}
                      for i, d in enumerate(dice)]
        result = gate.evaluate({"prompts": 20, "dice_mean": float(dice.mean()),
                                "dice_min": float(dice.min())})
        return {"prompts": 20, "dice_mean": float(dice.mean()), "dice_min": float(dice.min()),
                "iou_mean": float(dice.mean() - 0.01), "embedding_cosine_min": 0.999,
                "logits_max_abs": 0.5, "per_prompt": per_prompt, "gate": result.to_dict()}

    return {
        "model": {"family": "litemedsam", "variant": "tinyvit"},
        "artifacts": [
            {"graph": "encoder", "format": "openvino_ir", "precision": "fp16",
             "validation": {"openvino": entry(0.001, DEFAULT_GATES["fp16"])}},
            {"graph": "encoder", "format": "openvino_ir", "precision": "int8",
             "validation": {"openvino": entry(0.004, DEFAULT_GATES["int8"])}},
        ],
        "builds": [{"rejected": [{"variant": "decoder onnx int8",
                                  "why": ["worst prompt Dice 0.71 < 0.90"]}]}],
    }


def test_report_is_self_contained_and_matches_the_manifest(tmp_path):
    manifest = fake_manifest()
    image = np.zeros((32, 32, 3), np.uint8)
    a = np.zeros((32, 32), bool)
    a[5:20, 5:20] = True
    cases = [WorstCase("encoder int8", "s0", "box 1", 0.91, image, a, np.roll(a, 3, 0),
                       np.array([4, 4, 21, 21]))]
    search = {"float_units": ["/conv1"], "int8_units": 1, "units": 2, "passed": True,
              "most_sensitive": [{"op": "/conv1", "rel_err_sq": 0.01, "share": 0.9},
                                 {"op": "/fc2", "rel_err_sq": 0.001, "share": 0.1}],
              "steps": [{"float_units": 1, "dice_mean": 0.995, "dice_min": 0.97,
                         "passed": True, "seconds": 1.0}]}
    files = write_report(tmp_path / "report", manifest, extras={"search": {"encoder": search}},
                         worst_cases=cases,
                         layer_errors={"int8": [{"rel_err": 0.01}, {"rel_err": 0.02}]})
    text, md = files.html.read_text(), files.markdown.read_text()
    assert len(files.figures) == 4 and all(f.stat().st_size > 1000 for f in files.figures)
    assert text.count("data:image/png;base64,") == 4 and "<img" in text
    assert "src=\"figures/" not in text  # self-contained
    for figure in files.figures:
        assert f"figures/{figure.name}" in md
    for artifact in manifest["artifacts"]:
        entry = artifact["validation"]["openvino"]
        for key in ("dice_mean", "dice_min"):
            assert f"{entry[key]:.4f}" in text and f"{entry[key]:.4f}" in md
    embedded = json.loads(re.search(r'id="samedge-figures">(.*?)</script>', text,
                                    re.S).group(1).replace("&quot;", '"'))
    assert embedded["encoder openvino_ir int8 (openvino)"]["dice_mean"] == \
        manifest["artifacts"][1]["validation"]["openvino"]["dice_mean"]
    assert "worst prompt Dice 0.71" in text and "Variants kept out" in md
    assert not list(tmp_path.glob(".report*"))  # staged folder swapped in, nothing left over
    write_report(tmp_path / "report", manifest)  # rewriting replaces it atomically
    assert (tmp_path / "report" / "report.html").is_file()


# -- OpenVINO NNCF and the whole build (slow) -------------------------------------------------
@pytest.mark.slow
def test_openvino_int8_revert_is_exact(litemedsam_bundle, decoder_feeds):
    from samedge.quantize.openvino_nncf import NncfConfig, OpenVinoMixed, nncf_quantize

    xml = litemedsam_bundle / "openvino" / "decoder_fp32.xml"
    quantized = nncf_quantize(xml, decoder_feeds, NncfConfig(subset_size=len(decoder_feeds)))
    mixed = OpenVinoMixed(xml, quantized)
    assert len(mixed.units) > 20 and any(u.weight for u in mixed.units.values())
    # a unit holds every op that reads one of its activation quantizers: reverting it cannot
    # leave a float op reading an INT8 activation kept alive by a quantized neighbour
    unit_of = {op: name for name, unit in mixed.units.items() for op in unit.members}
    assert sorted(unit_of) == sorted(mixed.ops)
    for consumers in mixed._fq_consumers.values():
        assert len({unit_of[c] for c in consumers}) == 1
    import openvino as ov

    core = ov.Core()
    feed = decoder_feeds[0]

    def run(model):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        inputs = {p.get_any_name(): feed[p.get_any_name()] for p in compiled.inputs}
        return compiled(inputs)[compiled.output("low_res_masks")]

    fp32 = run(mixed.float_model)
    np.testing.assert_allclose(run(mixed.realize([])), fp32, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(run(mixed.realize(mixed.units)), run(quantized), atol=1e-5)


@pytest.mark.slow
def test_search_times_the_passing_splits_when_asked(bundle_copy, real_slices, litemedsam_card):
    """``--search-speed on`` on this CPU (where ``auto`` would skip it): the OpenVINO INT8
    decoder's passing splits are opened through the runtime's backend, timed in interleaved
    rounds, and the evidence lands in the manifest next to the search."""
    from samedge.quantize.build import build_variants
    from samedge.quantize.candidates import SearchOptions

    validation = [s for s in real_slices if s.name in ("CT_small.dcm", "examples_overlay.dcm")]
    calib = CalibrationSet(slices=[s for s in real_slices if s.name == "693_J2KI.dcm"],
                           count=2, augment=True)
    search = SearchOptions(granularity="block", ranking_count=1, tune_count=2,
                           max_evaluations=6, speed="on", tune_on="validation")
    result = build_variants(bundle_copy, "int8", "openvino", ("decoder",), calib, validation,
                            search=search, card=litemedsam_card, threads=2, layer_errors=False)
    candidate = (result.added + result.rejected)[0]
    speed = candidate.search.speed
    assert speed is not None
    if result.added:  # recorded with the artifact
        artifact = Bundle(bundle_copy).find("decoder", "openvino", "int8")
        assert artifact["quantization"]["search"]["speed"] == speed
    if speed["timed"]:
        assert len(speed["seconds"]) >= 2
        assert all(len(v) >= 5 and min(v) > 0 for v in speed["seconds"].values())
        assert speed["chosen_float"] >= speed["fewest_float"]
    else:
        assert "one passing split" in speed["why"]


def test_split_timing_resolves_by_what_the_cpu_computes():
    from samedge.quantize.candidates import SearchOptions

    avx2 = frozenset({"avx2", "fma"})
    vnni = frozenset({"avx2", "avx512f", "avx512_vnni"})
    amx = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_int8"})
    auto = SearchOptions()
    assert not auto.times_splits("int8", avx2) and auto.times_splits("int8", vnni)
    assert auto.times_splits("bf16", amx) and not auto.times_splits("bf16", vnni)
    assert not auto.times_splits("fp16", amx)
    assert SearchOptions(speed="on").times_splits("int8", avx2)
    assert not SearchOptions(speed="off").times_splits("int8", amx)
    with pytest.raises(SamedgeError, match="search speed"):
        SearchOptions(speed="fast").times_splits("int8", avx2)


@pytest.mark.slow
def test_build_adds_only_gate_passing_variants(bundle_copy, real_slices, litemedsam_card):
    from samedge.quantize.build import build_variants
    from samedge.quantize.candidates import SearchOptions
    from samedge.validation.validate import validate_bundle

    validation = [s for s in real_slices if s.name in ("CT_small.dcm", "examples_overlay.dcm")]
    calib = CalibrationSet(slices=[s for s in real_slices if s.name == "693_J2KI.dcm"],
                           count=2, augment=True)
    before = Bundle(bundle_copy).manifest
    # 1. a gate nothing can meet: the variant is kept out and the bundle says why
    impossible = GateSet().override("int8", max_mean_dice_drop=0.0, min_worst_dice=1.0)
    result = build_variants(bundle_copy, "int8", "onnxruntime", ("decoder",), calib, validation,
                            gates=impossible, search=SearchOptions(method="none"),
                            card=litemedsam_card, threads=2, layer_errors=False)
    assert not result.added and result.rejected
    bundle = Bundle(bundle_copy)
    assert not [a for a in bundle.artifacts if a["precision"] == "int8"]
    assert len(bundle.artifacts) == len(before["artifacts"])
    assert "Dice" in bundle.manifest["builds"][-1]["rejected"][0]["why"]
    # 2. FP16 ONNX passes its gate and lands next to its drift results
    result = build_variants(bundle_copy, "fp16", "onnxruntime", ("decoder",), calib, validation,
                            card=litemedsam_card, threads=2)
    assert [c.label() for c in result.added] == ["decoder onnx fp16"]
    bundle = Bundle(bundle_copy)  # hashes verified
    artifact = bundle.find("decoder", "onnxruntime", "fp16")
    entry = artifact["validation"]["onnxruntime"]
    assert entry["gate"]["passed"] and entry["prompts"] == 10
    assert len(entry["per_prompt"]) == 10 and entry["measured_with"]["decoder"] == "fp16"
    report = (bundle_copy / "report" / "report.html").read_text()
    assert f"{entry['dice_mean']:.4f}" in report and f"{entry['dice_min']:.4f}" in report
    # 3. validate re-measures every variant on held-out slices and gates it: exit code 1 when a
    #    gate fails, with the report written either way
    strict = validate_bundle(bundle_copy, None, card=litemedsam_card, threads=2,
                             slices=validation[:1],
                             gates=GateSet().override(min_worst_dice=1.0, max_mean_dice_drop=0.0),
                             report_dir=bundle_copy.parent / "validation")
    assert strict.exit_code == 1 and not strict.passed
    assert "onnxruntime fp32" in strict.variants and "gate" not in strict.variants[
        "onnxruntime fp32"]
    failed = [label for label, v in strict.variants.items() if "gate" in v]
    assert failed and all(not strict.variants[f]["gate"]["passed"] for f in failed)
    text = (strict.report / "report.html").read_text()
    assert "Validation run: FAIL" in text
    for label in failed:
        assert f"{strict.variants[label]['dice_mean']:.4f}" in text
    assert json.loads((strict.report / "validation.json").read_text())["passed"] is False


def test_calibrate_records_the_calibration_set(bundle_copy, tmp_path):
    from samedge.quantize.build import calibration_from_manifest
    from samedge.quantize.calibrate import calibrate_bundle

    folder = write_pngs(tmp_path / "ct", 12)
    manifest = calibrate_bundle(bundle_copy, [folder], window="ct-abdomen", count=8,
                                augment=False)
    spec = manifest["calibration"]
    assert spec["slices"] == 8 and spec["window"] == "abdomen" and not spec["bundled"]
    assert spec["statistics"]["slices"] == 8 and 0.0 <= spec["statistics"]["input_min"]
    again = calibration_from_manifest(Bundle(bundle_copy).manifest)
    assert again.count == 8 and [Path(p) for p in again.paths] == [folder]
    with pytest.raises(DataSourceError):
        calibrate_bundle(bundle_copy, [tmp_path / "nowhere"])
    with pytest.raises(ImageError):
        calibrate_bundle(bundle_copy, [folder], window="ct-elbow")


def test_pipeline_precision_step_gates_fp16_and_keeps_fp32_default(bundle_copy, real_slices,
                                                                    litemedsam_card):
    """`samedge pipeline` without INT8: a failing FP16 IR leaves the bundle with the reason
    recorded, and the default is the fastest gate-passing variant (FP32 unless clearly faster)."""
    from samedge.pipeline.precision import quantize_for_pipeline
    from samedge.speed.selection import SelectionRule

    measured = {("openvino", "fp32"): fake_drift("fp32", [1.0] * 5),
                ("openvino", "fp16"): fake_drift("fp16", [1.0, 1.0, 0.97, 1.0, 1.0])}
    slices = [s for s in real_slices if s.name == "CT_small.dcm"]
    result = quantize_for_pipeline(bundle_copy, litemedsam_card, slices, threads=2,
                                   measured=measured, int8=False,
                                   rule=SelectionRule(rounds=3, max_rounds=3))
    bundle = Bundle(bundle_copy)
    assert not [a for a in bundle.artifacts if a["format"] == "openvino_ir"
                and a["precision"] == "fp16"]
    rejected = bundle.manifest["builds"][-1]["rejected"]
    assert {r["variant"] for r in rejected} == {"encoder openvino_ir fp16",
                                                "decoder openvino_ir fp16"}
    assert "worst prompt Dice 0.9700" in " ".join(rejected[0]["why"])
    assert any("openvino fp16 kept out of the bundle" in m for m in result.messages)
    rows = {r.label: r for r in result.rows}
    assert rows["openvino fp32"].passed and not rows["openvino fp16"].in_bundle
    assert result.default.label == "openvino fp32" and rows["openvino fp32"].encoder_s > 0
    default = bundle.manifest["default_variant"]
    assert (default["backend"], default["precision"], default["decoder_precision"]) == (
        "openvino", "fp32", "fp32")
    assert "openvino fp32" in default["timed"] and default["rule"]["margin"] > 0


def test_depth_calibration_feeds_real_adjacent_stacks():
    """A depth model is calibrated on D adjacent slices of each volume (what its Conv3d/depth
    attention sees at run time), not on one slice repeated D times; augmented repeats flip and
    scale a whole stack alike."""
    from samedge.data.bundled import bundled_volume
    from samedge.runtime.transforms import preprocess

    volume = bundled_volume()
    calib = CalibrationSet([volume.source], count=4, augment=False)
    stacks = list(calib.iter_items(3))
    assert all(len(s) == 3 for s in stacks)
    for stack in stacks:
        z = [int(s.name.split("z=")[1].rstrip("]")) for s in stack]
        assert np.diff(z).tolist() in ([1, 1], [0, 1], [1, 0])  # ends replicated
    feed = next(iter(calib.encoder_inputs(PRE, depth=3)))["image"]
    assert feed.shape == (3, 3, PRE.image_size, PRE.image_size)
    assert not np.allclose(feed[0], feed[1])
    np.testing.assert_array_equal(feed[1:2], preprocess(stacks[0][1].image, PRE)[0])
    def flipped(got: np.ndarray, original: np.ndarray) -> bool:
        same = np.corrcoef(got.ravel(), original.ravel())[0, 1]
        mirrored = np.corrcoef(got.ravel(), original[:, ::-1].ravel())[0, 1]
        return bool(mirrored > same)

    augmented = list(CalibrationSet(slices=[stacks[0]], count=6, augment=True).iter_items(3))[1:]
    verdicts = []
    for stack in augmented:
        flips = {flipped(a.image.astype(float), b.image.astype(float))
                 for a, b in zip(stack, stacks[0])}
        assert len(flips) == 1  # one draw for the whole stack
        verdicts += flips
    assert set(verdicts) == {True, False}  # and the draws differ between stacks


def test_clicks_reach_row_col_models_swapped():
    """Med-SA's legacy and 3-D models read clicks as (row, col): validation and decoder
    calibration put each click at its box's centre in that order."""
    from samedge.data.prompts import PromptSet

    prompt = PromptSet(boxes=np.float32([[10, 20, 30, 60]]), clicks=np.float32([[[20, 40]]]))
    np.testing.assert_array_equal(prompt.model_clicks(replace(PRE, point_order="yx")),
                                  [[[40, 20]]])
    np.testing.assert_array_equal(prompt.model_clicks(PRE), [[[20, 40]]])
