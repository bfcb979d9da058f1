"""TensorRT engines from the bundle's ONNX graphs, built on the target device.

Two build paths cover the field's devices: TensorRT 10.12+ and 11.x build *strongly typed*
networks, where precision comes from the graph itself (the mixed FP16 ONNX with LayerNorm/softmax
kept FP32, or the explicit Q/DQ INT8 ONNX from ``samedge.quantize``); older TensorRT
(8.5 on JetPack 5, 10.3 on JetPack 6) builds the FP32 graph with the FP16 builder flag. Implicit
INT8 calibrators are deprecated since 10.1 and removed in 11, so INT8 always comes from Q/DQ.
The decoder gets an optimisation profile over the prompt batch B and point count N.
Written to TensorRT's documented API and not verified on a GPU in this repository: see README.
"""

from __future__ import annotations

import json
from pathlib import Path

from samedge.errors import BackendUnavailableError
from samedge.runtime.backends.trt_compat import gpu_compute_capability


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not importable here ({exc})",
            hint="build engines on the target GPU/Jetson where TensorRT is installed "
                 "(JetPack ships it); pip install 'samedge[tensorrt]' adds Polygraphy",
        ) from exc
    return trt


def strongly_typed_default(version: str) -> bool:
    major, minor = (int(v) for v in version.split(".")[:2])
    return (major, minor) >= (10, 12)


def decoder_profile(spec_inputs: dict, max_prompts: int = 16, max_points: int = 16) -> dict:
    """min/opt/max shapes for the decoder's dynamic axes (B prompts, N points)."""
    sizes = {"prompts": (1, 1, max_prompts), "points": (1, 3, max_points)}
    profile = {}
    for name, shape in spec_inputs.items():
        profile[name] = tuple(
            tuple(sizes[d][i] if isinstance(d, str) else d for d in shape) for i in range(3))
    return profile


def build_engine(onnx_path: Path, engine_path: Path, graph_inputs: dict, precision: str,
                 strongly_typed: bool | None = None, version_compatible: bool = False,
                 hardware_compatible: bool = False, workspace_gib: float = 2.0) -> list[Path]:
    """Build ``engine_path`` (+ a JSON sidecar recording TensorRT version and GPU)."""
    trt = _tensorrt()
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_bytes_from_network,
        network_from_onnx_path,
    )

    typed = strongly_typed_default(trt.__version__) if strongly_typed is None else strongly_typed
    profile = Profile()
    for name, (low, opt, high) in decoder_profile(graph_inputs).items():
        profile.add(name, min=low, opt=opt, max=high)
    flags = {}
    if not typed and precision == "fp16":
        flags["fp16"] = True
    if version_compatible:
        flags["version_compatible"] = True
    if hardware_compatible:
        flags["hardware_compatibility_level"] = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    config = CreateConfig(profiles=[profile], memory_pool_limits={
        trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 2**30)}, **flags)
    network = network_from_onnx_path(str(onnx_path), strongly_typed=typed)
    engine_path.write_bytes(engine_bytes_from_network(network, config=config))
    meta = {
        "tensorrt_version": trt.__version__,
        "compute_capability": gpu_compute_capability(),
        "precision": precision,
        "strongly_typed": typed,
        "version_compatible": version_compatible,
        "hardware_compatible": hardware_compatible,
    }
    sidecar = engine_path.with_suffix(".json")
    sidecar.write_text(json.dumps(meta, indent=2))
    return [engine_path, sidecar]
