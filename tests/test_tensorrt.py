"""TensorRT without TensorRT: the version dispatch, build flags, profiles, portability rules, the
runtime's batch splitting and the builder/runtime glue, driven as pure functions or against a
stand-in with the documented API's shape (tests/fake_tensorrt.py). What needs a GPU lives in
test_tensorrt_gpu.py (marker ``gpu``)."""

from __future__ import annotations

import importlib
import json
import sys

import fake_tensorrt  # tests/ is on sys.path (pytest's default rootdir-relative import)
import numpy as np
import pytest

from samedge.errors import (
    BackendUnavailableError,
    EngineCompatibilityError,
    ExportError,
    PromptError,
)
from samedge.export.tensorrt import (
    EngineOptions,
    build_plan,
    fp32_nodes,
    pinned_layers,
    profile_shapes,
)
from samedge.runtime.backends import trt_compat
from samedge.runtime.backends.trt_compat import (
    check_engine_compatibility,
    hardware_problem,
    run_in_batches,
    version_problem,
)

PROMPT_DECODER = {"image_embeddings": (1, 256, 64, 64), "point_coords": ("prompts", "points", 2),
                  "point_labels": ("prompts", "points"), "mask_input": ("prompts", 1, 256, 256),
                  "has_mask_input": ("prompts",)}


def _have_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


# -- 1. supported range ---------------------------------------------------------------------------
def test_tensorrt_older_than_8_6_is_refused_naming_layernorm():
    with pytest.raises(BackendUnavailableError, match="LayerNormalization") as err:
        build_plan("8.5.2", "fp16")
    assert "JetPack" in err.value.hint
    with pytest.raises(BackendUnavailableError, match="9.x"):
        build_plan("9.3.0", "fp16")
    for version in ("8.6.1", "10.3.0", "10.16.2", "11.4.0"):
        build_plan(version, "fp16")


def test_build_refuses_jetpack5_tensorrt_before_any_work(monkeypatch):
    from samedge.quantize.build import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make("8.5.2"))
    with pytest.raises(BackendUnavailableError, match="LayerNormalization") as err:
        require_tensorrt("int8")
    assert "--backend onnxruntime" in err.value.hint


# -- 2./3. what the builder is told -------------------------------------------------------------
def test_int8_on_weakly_typed_tensorrt_sets_the_int8_flag():
    plan = build_plan("8.6.1", "int8")
    assert not plan.strongly_typed and "INT8" in plan.builder_flags
    assert "FP16" not in plan.builder_flags  # the Q/DQ graph's float layers stay FP32


def test_strong_typing_from_10_0_sets_no_precision_flag():
    for version, network in (("10.0.1", ("STRONGLY_TYPED",)), ("10.3.0", ("STRONGLY_TYPED",)),
                             ("11.4.0", ())):  # 11.x: always strongly typed, flag deprecated
        for precision in ("fp16", "int8", "fp32"):
            plan = build_plan(version, precision)
            assert plan.strongly_typed and plan.network_flags == network
            assert not {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"} & set(plan.builder_flags)
            assert not plan.pin_fp32
    assert build_plan("8.6.1", "fp32").network_flags == ("EXPLICIT_BATCH",)


def test_fp16_on_weakly_typed_tensorrt_pins_the_graphs_fp32_nodes():
    plan = build_plan("8.6.1", "fp16")
    assert {"FP16", "OBEY_PRECISION_CONSTRAINTS"} <= set(plan.builder_flags) and plan.pin_fp32
    assert "TF32" in plan.cleared_flags  # FP32 layers compute in FP32, as validated


def test_portability_options_reach_the_plan():
    options = EngineOptions(version_compatible=True, hardware_compatible=True)
    plan = build_plan("10.3.0", "fp16", options)
    assert "VERSION_COMPATIBLE" in plan.builder_flags
    assert plan.hardware_compatibility == "AMPERE_PLUS"
    with pytest.raises(BackendUnavailableError, match="Jetson"):
        build_plan("10.3.0", "fp16", options, jetson=True)


def _toy_graph(path):
    """x → LayerNormalization → MatMul → Softmax → Add(residual) → y, FP32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("scale", np.ones(8)), ("bias", np.zeros(8)), ("w", rng.normal(size=(8, 8))))]
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["n"], name="norm",
                              axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["m"], name="proj"),
             helper.make_node("Softmax", ["m"], ["s"], name="attn", axis=-1),
             helper.make_node("Add", ["s", "x"], ["y"], name="residual")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [2, 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_fp32_nodes_of_a_mixed_graph_are_the_ones_the_conversion_kept(tmp_path):
    import onnx

    from samedge.quantize.fp16 import convert_fp16

    conversion = convert_fp16(_toy_graph(tmp_path / "toy.onnx"), tmp_path / "mixed.onnx")
    kept = fp32_nodes(onnx.load(str(conversion.path)))
    assert set(kept) == {"norm", "attn", "residual"} == set(conversion.kept_fp32)
    assert "proj" not in kept  # the MatMul runs in FP16


def test_pinned_layers_follow_the_parsers_naming():
    layers = ["norm", "norm_3", "norm_4", "proj", "proj_1", "residual", "other_2"]
    assert pinned_layers(layers, ["norm", "residual"], ["norm", "proj", "proj_1", "residual"]) \
        == ["norm", "norm_3", "norm_4", "residual"]  # proj_1 is a node of its own


def _build_with_fake(monkeypatch, tmp_path, version, precision, onnx_path, inputs, **options):
    from samedge.export import tensorrt as builder

    trt = fake_tensorrt.make(version, extra_layers={"norm": 2})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(builder, "gpu_compute_capability", lambda: "8.7")
    monkeypatch.setattr(builder, "is_jetson", lambda: False)
    files = builder.build_engine(onnx_path, tmp_path / "x.engine", inputs, precision,
                                 EngineOptions(**options))
    return trt, json.loads(files[1].read_text())


def test_builder_sets_int8_flag_on_8_6_and_records_it(monkeypatch, tmp_path):
    graph = _toy_graph(tmp_path / "toy.onnx")
    trt, record = _build_with_fake(monkeypatch, tmp_path, "8.6.1", "int8", graph, {"x": (2, 8)})
    assert trt.BuilderFlag.INT8 in trt.config.flags
    assert trt.BuilderFlag.TF32 in trt.config.cleared
    assert trt.network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    assert record["builder_flags"] == ["INT8"] and record["strongly_typed"] is False
    assert record["tensorrt_version"] == "8.6.1" and record["compute_capability"] == "8.7"


def test_builder_pins_fp32_layers_on_8_6_fp16(monkeypatch, tmp_path):
    from samedge.quantize.fp16 import convert_fp16

    mixed = convert_fp16(_toy_graph(tmp_path / "toy.onnx"), tmp_path / "mixed.onnx").path
    trt, record = _build_with_fake(monkeypatch, tmp_path, "8.6.1", "fp16", mixed, {"x": (2, 8)})
    assert {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS} <= trt.config.flags
    pinned = {layer.name for layer in trt.network.layers if layer.precision == trt.float32}
    assert pinned == {"norm", "norm_1", "norm_2", "attn", "residual"}
    for layer in trt.network.layers:  # float outputs only: an INT32 output keeps its type
        assert layer.output_types == ({0: trt.float32} if layer.name in pinned else {})
    assert record["fp32_pinned_layers"] == 5


def test_builder_builds_strongly_typed_on_10_with_the_profile(monkeypatch, tmp_path):
    graph = _toy_graph(tmp_path / "toy.onnx")
    trt, record = _build_with_fake(monkeypatch, tmp_path, "10.3.0", "fp16", graph,
                                   {"x": ("prompts", 8)}, max_prompts=4)
    assert trt.network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert not trt.config.flags and not any(layer.precision for layer in trt.network.layers)
    assert trt.config.profiles[0].shapes["x"] == ((1, 8), (1, 8), (4, 8))
    assert record["profile"]["x"] == {"min": [1, 8], "opt": [1, 8], "max": [4, 8]}


# -- 4. profiles for every family -----------------------------------------------------------------
def test_prompt_decoder_profile():
    profile = profile_shapes(PROMPT_DECODER, EngineOptions(max_prompts=8, max_points=5))
    assert profile["point_coords"] == ((1, 1, 2), (1, 2, 2), (8, 5, 2))
    assert profile["mask_input"] == ((1, 1, 256, 256), (1, 1, 256, 256), (8, 1, 256, 256))
    assert profile["image_embeddings"][2] == (1, 256, 64, 64)


def test_semantic_decoder_profile_covers_images():
    profile = profile_shapes({"image_embeddings": ("images", 256, 32, 32)}, EngineOptions(),
                             depth=5)
    assert profile["image_embeddings"] == ((1, 256, 32, 32), (5, 256, 32, 32),
                                           (16, 256, 32, 32))
    deep = profile_shapes({"image_embeddings": ("images", 256, 32, 32)},
                          EngineOptions(max_images=2), depth=5)
    assert deep["image_embeddings"][2][0] == 5  # never below the model's own stack


def test_depth_encoder_profile_and_unknown_axes():
    assert profile_shapes({"image": ("depth", 3, 512, 512)}, EngineOptions(), depth=3) == {
        "image": ((3, 3, 512, 512),) * 3}
    assert profile_shapes({"image": (1, 3, 256, 256)}, EngineOptions()) == {
        "image": ((1, 3, 256, 256),) * 3}
    with pytest.raises(ExportError, match="'height'"):
        profile_shapes({"x": (1, "height")}, EngineOptions())


# -- 5. batches above the profile -----------------------------------------------------------------
def _profile(shapes):
    return {n: {"min": list(lo), "opt": list(lo), "max": list(hi)} for n, (lo, hi) in
            shapes.items()}


def test_prompt_batches_above_the_profile_are_split():
    profile = _profile({"image_embeddings": ((1, 4), (1, 4)), "point_coords": ((1, 1, 2),
                                                                               (16, 16, 2)),
                        "has_mask_input": ((1,), (16,))})
    calls = []

    def run(feed):
        calls.append({n: np.shape(v) for n, v in feed.items()})
        assert feed["point_coords"].shape[0] <= 16
        return {"iou": feed["point_coords"][:, 0, 0] * 2, "masks": feed["has_mask_input"] + 1}

    feed = {"image_embeddings": np.ones((1, 4)), "has_mask_input": np.arange(40.0),
            "point_coords": np.arange(40 * 3 * 2, dtype=float).reshape(40, 3, 2)}
    out = run_in_batches(run, feed, profile)
    assert [c["point_coords"][0] for c in calls] == [16, 16, 8]
    assert all(c["image_embeddings"] == (1, 4) for c in calls)  # the embedding goes whole
    np.testing.assert_array_equal(out["iou"], feed["point_coords"][:, 0, 0] * 2)
    np.testing.assert_array_equal(out["masks"], np.arange(40.0) + 1)
    with pytest.raises(PromptError, match="axis 1 is 17"):
        run_in_batches(run, {**feed, "point_coords": np.zeros((2, 17, 2))}, profile)


def test_semantic_images_above_the_profile_are_split():
    profile = _profile({"image_embeddings": ((1, 3), (4, 3))})
    sizes = []

    def run(feed):
        sizes.append(len(feed["image_embeddings"]))
        return {"logits": feed["image_embeddings"] * 3}

    stack = np.arange(30.0).reshape(10, 3)
    np.testing.assert_array_equal(run_in_batches(run, {"image_embeddings": stack}, profile)
                                  ["logits"], stack * 3)
    assert sizes == [4, 4, 2]


# -- 6. portability rules, the device query, host code -------------------------------------------
@pytest.mark.parametrize("built, runtime, compatible, ok", [
    ("10.3.0", "10.3.0", False, True),
    ("10.3.0.26", "10.3.0.30", False, False),  # major, minor, patch and build must match
    ("10.3.0", "10.3.0.30", False, True),  # Python's trt.__version__ stops at the patch
    ("10.3.0", "8.5.2", False, False),
    ("8.6.1", "10.3.0", True, True),  # version-compatible 8 → 10
    ("10.5.0", "10.3.0", True, False),  # newer engine, older runtime
    ("10.3.0", "10.13.3", True, True),
    ("10.13.3", "11.4.0", True, True),  # 10 → 11
    ("8.6.1", "11.4.0", True, False),  # no other cross-major pair
    ("8.5.2", "8.6.1", True, False),  # version compatibility starts at 8.6
])
def test_version_rules_follow_nvidias_documentation(built, runtime, compatible, ok):
    assert (version_problem(built, runtime, compatible) is None) is ok


def test_hardware_rules():
    assert hardware_problem("8.7", "8.7", False) is None
    assert "9.0" in hardware_problem("8.7", "9.0", False)
    assert hardware_problem("8.6", "9.0", True) is None  # AMPERE_PLUS
    assert "8.0+" in hardware_problem("8.6", "7.5", True)


def test_unknown_gpu_or_missing_sidecar_is_refused_not_skipped():
    with pytest.raises(EngineCompatibilityError, match="cannot tell this machine's GPU"):
        check_engine_compatibility({"tensorrt_version": "10.3.0", "compute_capability": "8.7"},
                                   "10.3.0", None)
    with pytest.raises(EngineCompatibilityError, match="sidecar is missing"):
        check_engine_compatibility(None, "10.3.0", "8.7")


def test_compute_capability_from_the_cuda_driver_without_nvidia_smi(monkeypatch):
    import subprocess

    def no_smi(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", no_smi)
    monkeypatch.setattr(trt_compat, "_cuda_driver_capability", lambda: "8.7")
    assert trt_compat.gpu_compute_capability() == "8.7"


@pytest.fixture
def fake_runtime(monkeypatch):
    """samedge's TensorRT backend imported over the fake module, Polygraphy's runner faked."""
    trt = fake_tensorrt.make("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.delitem(sys.modules, "samedge.runtime.backends.tensorrt", raising=False)
    module = importlib.import_module("samedge.runtime.backends.tensorrt")
    monkeypatch.setattr(module, "gpu_compute_capability", lambda: "8.7")

    class Runner:
        is_active = False

        def __init__(self, engine):
            self.engine = engine

        def activate(self):
            self.is_active = True

        def deactivate(self):
            self.is_active = False

        def infer(self, feed):
            assert len(feed["x"]) <= 2
            return {"y": feed["x"] + 1}

    monkeypatch.setattr(module, "TrtRunner", Runner)
    yield trt, module
    sys.modules.pop("samedge.runtime.backends.tensorrt", None)


def _engine(tmp_path, **record):
    path = tmp_path / "graph.engine"
    path.write_bytes(b"plan")
    base = {"tensorrt_version": "10.3.0", "compute_capability": "8.7",
            "profile": {"x": {"min": [1], "opt": [1], "max": [2]}}}
    path.with_suffix(".json").write_text(json.dumps({**base, **record}))
    return path


def test_host_code_is_allowed_for_version_compatible_engines_only(fake_runtime, tmp_path):
    trt, module = fake_runtime
    module.TensorRtBackend(_engine(tmp_path, version_compatible=True, tensorrt_version="8.6.1"))
    assert trt.calls[-1] == ("deserialize", True)
    backend = module.TensorRtBackend(_engine(tmp_path))
    assert trt.calls[-1] == ("deserialize", False)
    np.testing.assert_array_equal(backend.run({"x": np.arange(5.0)})["y"], np.arange(5.0) + 1)


def test_runtime_refuses_an_engine_without_its_record(fake_runtime, tmp_path):
    _, module = fake_runtime
    path = _engine(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(EngineCompatibilityError, match="sidecar"):
        module.TensorRtBackend(path)


# -- 7. ONNX Runtime runs what was validated -------------------------------------------------------
def test_onnxruntime_stays_on_cpu_when_cuda_is_present(monkeypatch, tmp_path):
    import onnxruntime as ort

    from samedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    seen = {}

    class Session:
        def __init__(self, path, options, providers):
            seen["providers"] = providers

        def get_inputs(self):
            return []

        get_outputs = get_inputs

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    OnnxRuntimeBackend(tmp_path / "x.onnx")
    assert seen["providers"] == ["CPUExecutionProvider"]
    OnnxRuntimeBackend(tmp_path / "x.onnx", providers=("CUDAExecutionProvider",))
    assert seen["providers"] == ["CUDAExecutionProvider"]


def test_asking_for_a_provider_that_is_absent_says_so(tmp_path):
    import onnxruntime as ort

    from samedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        OnnxRuntimeBackend(tmp_path / "x.onnx", providers=("CUDAExecutionProvider",))


# -- without TensorRT -----------------------------------------------------------------------------
@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT present: the GPU tests cover it")
def test_build_without_tensorrt_says_what_to_do(tmp_path):
    from samedge.export.tensorrt import build_engine

    with pytest.raises(BackendUnavailableError, match="TensorRT is not importable"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.engine", {}, "fp16")


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT present")
def test_runtime_without_tensorrt_names_the_extra(litemedsam_bundle):
    from samedge.runtime.backends import open_backend

    with pytest.raises(BackendUnavailableError, match="samedge\\[tensorrt\\]"):
        open_backend("tensorrt", litemedsam_bundle / "encoder.onnx")
