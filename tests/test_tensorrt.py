"""TensorRT: compatibility rules run everywhere; building and running need a GPU with TensorRT."""

from __future__ import annotations

import pytest

from samedge.errors import BackendUnavailableError, EngineCompatibilityError
from samedge.export.tensorrt import decoder_profile, strongly_typed_default
from samedge.runtime.backends.trt_compat import check_engine_compatibility


def test_engine_from_another_tensorrt_is_refused():
    with pytest.raises(EngineCompatibilityError, match="TensorRT 10.3"):
        check_engine_compatibility({"tensorrt_version": "10.3.0"}, "8.5.2", "8.7")
    check_engine_compatibility({"tensorrt_version": "10.3.0.26"}, "10.3.0", "8.7")


def test_version_compatible_engine_crosses_10_to_11_only():
    built = {"tensorrt_version": "10.13.3", "version_compatible": True}
    check_engine_compatibility(built, "11.4.0", None)
    with pytest.raises(EngineCompatibilityError):
        check_engine_compatibility({**built, "tensorrt_version": "8.6.1"}, "10.3.0", None)


def test_engine_for_another_gpu_is_refused():
    with pytest.raises(EngineCompatibilityError, match="compute capability 8.7"):
        check_engine_compatibility({"tensorrt_version": "10.3", "compute_capability": "8.7"},
                                   "10.3", "9.0")
    check_engine_compatibility({"tensorrt_version": "10.3", "compute_capability": "8.7",
                                "hardware_compatible": True}, "10.3", "9.0")


def test_strong_typing_from_10_12():
    assert not strongly_typed_default("10.3.0")
    assert strongly_typed_default("10.13.3") and strongly_typed_default("11.4.0")


def test_decoder_profile_covers_16_prompts_and_points():
    profile = decoder_profile({"image_embeddings": (1, 256, 64, 64),
                               "point_coords": ("prompts", "points", 2),
                               "has_mask_input": ("prompts",)})
    assert profile["point_coords"] == ((1, 1, 2), (1, 3, 2), (16, 16, 2))
    assert profile["image_embeddings"][2] == (1, 256, 64, 64)


def test_build_without_tensorrt_says_what_to_do(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from samedge.export.tensorrt import build_engine

        with pytest.raises(BackendUnavailableError, match="TensorRT is not importable"):
            build_engine(tmp_path / "x.onnx", tmp_path / "x.engine", {}, "fp16")
    else:
        pytest.skip("TensorRT present: covered by the GPU test")


def test_runtime_without_tensorrt_names_the_extra(litemedsam_bundle):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from samedge.runtime.backends import open_backend

        with pytest.raises(BackendUnavailableError, match="samedge\\[tensorrt\\]"):
            open_backend("tensorrt", litemedsam_bundle / "encoder.onnx")
    else:
        pytest.skip("TensorRT present")
