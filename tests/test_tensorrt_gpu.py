"""TensorRT on a real GPU: builder, runtime and ``validate --backend tensorrt`` on the Quickstart
(LiteMedSAM) bundle. Marker ``gpu``; each test skips, saying why, where TensorRT or a GPU is
missing (``pytest -m gpu --collect-only`` lists them; ``benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from samedge.runtime.backends.trt_compat import gpu_compute_capability, support_problem


def _why_not() -> str | None:
    try:
        import tensorrt as trt
    except ImportError as exc:
        return f"TensorRT is not importable ({exc})"
    problem = support_problem(trt.__version__)
    if problem:
        return problem
    if gpu_compute_capability() is None:
        return "no NVIDIA GPU visible (the CUDA driver answered no device query)"
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]


@pytest.fixture(scope="module")
def validation(real_slices):
    return [s for s in real_slices if s.name in ("CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm")]


@pytest.fixture(scope="module")
def engine_bundle(litemedsam_bundle, litemedsam_card, validation, tmp_path_factory):
    """The Quickstart bundle with FP16 engines for both graphs, built and measured here."""
    from samedge.quantize.build import build_variants

    out = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(litemedsam_bundle, out)
    result = build_variants(out, "fp16", "tensorrt", card=litemedsam_card, validation=validation,
                            report=False, layer_errors=False)
    return out, result


def test_builder_builds_fp16_engines_that_earn_their_gate(engine_bundle):
    from samedge.runtime.bundle import Bundle

    path, result = engine_bundle
    engines = [c for c in result.added if c.fmt == "tensorrt_engine"]
    assert {c.graph for c in engines} == {"encoder", "decoder"}, result.lines()
    for artifact in Bundle(path).artifacts:
        if artifact["format"] == "tensorrt_engine":
            own = artifact["validation"]["tensorrt"]
            assert own["gate"]["passed"] and artifact["engine"]["profile"]
            assert artifact["validation_combined"]["gate"]["passed"]


def _searched_decoder_engines(path, precision, card, validation) -> list:
    """``build --backend tensorrt`` of the decoder at ``precision`` (its ONNX graph searched
    first); every engine must have been built and measured itself, whatever its verdict."""
    from samedge.quantize.build import build_variants
    from samedge.quantize.candidates import SearchOptions

    result = build_variants(path, precision, "tensorrt", ("decoder",), card=card,
                            validation=validation, search=SearchOptions(max_evaluations=6),
                            report=False, layer_errors=False)
    engines = [c for c in result.added + result.rejected if c.fmt == "tensorrt_engine"]
    assert engines, result.lines()
    for candidate in engines:
        assert candidate.error is None, candidate.error
        assert candidate.drift is not None  # measured itself, whatever the verdict
        if candidate.precision == precision:  # an FP32 partner engine carries no gate
            assert candidate.kept == (candidate in result.added)
    return engines


def test_builder_builds_int8_engines_each_measured(engine_bundle, litemedsam_card, validation):
    _searched_decoder_engines(engine_bundle[0], "int8", litemedsam_card, validation)


def test_builder_builds_bf16_engines_from_the_searched_bf16_graph(engine_bundle, litemedsam_card,
                                                                  validation):
    """BF16 (Ampere and later): the graph searched through its CPU stand-in, then the engine,
    which is measured again on this GPU: the stand-in's verdict is not inherited."""
    from samedge.export.tensorrt import BF16_MIN_CAPABILITY

    capability = gpu_compute_capability()
    if tuple(int(p) for p in capability.split(".")[:2]) < BF16_MIN_CAPABILITY:
        pytest.skip(f"compute capability {capability} has no BF16 tensor cores")
    engines = _searched_decoder_engines(engine_bundle[0], "bf16", litemedsam_card, validation)
    assert [c.meta["built_from"] for c in engines if c.precision == "bf16"] == [
        "decoder_bf16.onnx"]


def test_runtime_runs_engines_and_splits_prompt_batches(engine_bundle, real_slices):
    from samedge.data.prompts import auto_boxes
    from samedge.runtime.predictor import Predictor
    from samedge.validation.drift import dice

    path, _ = engine_bundle
    image = next(s for s in real_slices if s.name == "CT_small.dcm").image
    boxes = np.tile(auto_boxes(image), (5, 1))[:20]  # 20 prompts > the profile's 16
    got, want = (Predictor(path, backend=b, precision=p) for b, p in (("tensorrt", "fp16"),
                                                                     ("onnxruntime", "fp32")))
    for predictor in (got, want):
        predictor.set_image(image)
    masks, reference = got.predict(boxes=boxes).masks, want.predict(boxes=boxes).masks
    assert masks.shape == reference.shape == (20, 1, *image.shape[:2])
    assert np.mean([dice(a[0], b[0]) for a, b in zip(masks, reference)]) > 0.98


def test_validate_tensorrt_remeasures_on_this_gpu(engine_bundle, litemedsam_card, validation,
                                                  tmp_path):
    from samedge.validation.validate import validate_bundle

    path, _ = engine_bundle
    result = validate_bundle(path, slices=validation, card=litemedsam_card,
                             backends=("tensorrt",), report_dir=tmp_path / "report")
    assert "tensorrt fp16" in result.variants and result.passed, result.variants.keys()
