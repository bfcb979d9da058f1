"""TensorRT engines from the bundle's ONNX graphs, built on the target device.

Every engine is built from the graph that carries its precision: the FP32 graph, the mixed FP16
graph (LayerNorm, softmax, residual adds and large-valued nodes kept FP32 with explicit Casts), the
mixed BF16 graph (the same, plus the units its accuracy search keeps FP32) or the explicit Q/DQ
INT8 graph. How TensorRT is told depends on its version (:func:`build_plan`):

- 10.x and 11.x build *strongly typed* networks: every tensor's type comes from the graph, so the
  engine computes what the graph says and no precision flag is set (10.x: the STRONGLY_TYPED
  network flag; 11.x: always strongly typed, the flag deprecated and ignored).
- 8.6 has no strong typing: weakly typed with the flags the graph needs — FP16 for the mixed
  graph, with OBEY_PRECISION_CONSTRAINTS and every layer of a node the graph keeps in FP32 pinned
  to FP32 (so TensorRT cannot run LayerNorm in FP16 where the validated graph does not), INT8 for
  the Q/DQ graph (required for Q/DQ on weakly typed networks). BF16 needs strong typing, so 10+.

TF32 is cleared: FP32 layers then compute in FP32, as validated. Each dynamic axis gets an
optimisation profile (:func:`profile_shapes`). Engines are measured after building
(``samedge.quantize.engines``); nothing here claims accuracy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from samedge.errors import BackendUnavailableError, ExportError, SamedgeError
from samedge.runtime.backends.trt_compat import (
    check_supported,
    gpu_compute_capability,
    is_jetson,
    parse_version,
)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
BF16_MIN_CAPABILITY = (8, 0)  # BF16 tensor cores: Ampere and later, Jetson Orin (8.7) included


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


@dataclass(frozen=True)
class EngineOptions:
    """Engine build options: the profile's limits (a prompt decoder's prompt batch B and point
    count N, a semantic decoder's images per call; the runtime splits larger batches, a larger N
    is refused), the builder's workspace, and portability (version/hardware compatibility)."""

    max_prompts: int = 16
    max_points: int = 16
    max_images: int = 16
    workspace_gib: float = 2.0
    version_compatible: bool = False
    hardware_compatible: bool = False

    def __post_init__(self):
        if min(self.max_prompts, self.max_images) < 1 or self.max_points < 2:
            raise SamedgeError("engine limits: --engine-max-prompts and --engine-max-images must "
                               "be at least 1, --engine-max-points at least 2 (a box is 2 points)")
        if self.workspace_gib <= 0:
            raise SamedgeError("--engine-workspace-gib must be positive")


def profile_shapes(inputs: dict[str, tuple], options: EngineOptions, depth: int = 1
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every graph input, from the spec's named dynamic axes: prompt
    decoders' ``prompts`` (B) and ``points`` (N: a box is 2), semantic decoders' ``images`` (one
    slice, or a depth model's D at once), a depth encoder's ``depth`` (fixed at the D it was
    validated at). Static inputs get their one shape."""
    ranges = {
        "prompts": (1, 1, options.max_prompts),
        "points": (1, 2, options.max_points),
        "images": (1, depth, max(options.max_images, depth)),
        "depth": (depth, depth, depth),
    }
    profile = {}
    for name, shape in inputs.items():
        unknown = [d for d in shape if isinstance(d, str) and d not in ranges]
        if unknown:
            raise ExportError(f"graph input {name} has dynamic axis {unknown[0]!r}, for which "
                              f"samedge has no TensorRT profile (it knows {sorted(ranges)})")
        profile[name] = tuple(tuple(ranges[d][i] if isinstance(d, str) else int(d) for d in shape)
                              for i in range(3))
    return profile


@dataclass(frozen=True)
class BuildPlan:
    """How TensorRT is told what to build: names of TensorRT enum members, so the plan is data
    (tested without TensorRT) and :func:`build_engine` only applies it."""

    strongly_typed: bool
    network_flags: tuple[str, ...]  # trt.NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]  # trt.BuilderFlag members to set
    cleared_flags: tuple[str, ...]  # trt.BuilderFlag members to clear
    pin_fp32: bool  # pin the layers of the graph's FP32 nodes to FP32
    hardware_compatibility: str | None  # trt.HardwareCompatibilityLevel member


def build_plan(version: str, precision: str, options: EngineOptions = EngineOptions(),
               jetson: bool = False, capability: str | None = None) -> BuildPlan:
    """The plan for TensorRT ``version`` on a GPU of compute ``capability`` (``"8.7"``; None:
    unknown); refuses unsupported versions and combinations."""
    check_supported(version)
    if precision not in PRECISIONS:
        raise SamedgeError(f"no TensorRT engine precision {precision!r}", hint=f"use {PRECISIONS}")
    if precision == "bf16":
        check_bf16(version, capability)
    if options.hardware_compatible and jetson:
        raise BackendUnavailableError(
            "hardware-compatible engines are not supported on Jetson (TensorRT builds them for "
            "Ampere-and-later discrete GPUs only)", hint="drop --engine-hardware-compatible")
    major = parse_version(version)[0]
    flags: list[str] = []
    if major >= 10:
        strongly = True
        network = ("STRONGLY_TYPED",) if major == 10 else ()
    else:
        strongly = False
        network = ("EXPLICIT_BATCH",)
        if precision == "fp16":
            flags += ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
        elif precision == "int8":
            flags += ["INT8"]
    if options.version_compatible:
        flags.append("VERSION_COMPATIBLE")
    return BuildPlan(strongly, network, tuple(flags), ("TF32",),
                     pin_fp32=not strongly and precision == "fp16",
                     hardware_compatibility="AMPERE_PLUS" if options.hardware_compatible else None)


def check_bf16(version: str, capability: str | None) -> None:
    """BF16 engines come from the BF16 ONNX graph through a strongly typed network (TensorRT 10
    and later) and need BF16 tensor cores (compute capability 8.0 and later)."""
    if parse_version(version)[0] < 10:
        raise BackendUnavailableError(
            f"TensorRT {version} builds no BF16 engines from ONNX: samedge builds them as "
            "strongly typed networks from the BF16 graph, which needs TensorRT 10 or later",
            hint="use --precision fp16 on this TensorRT, or TensorRT 10+ (JetPack 6 and later)")
    if capability is not None:
        have = tuple(int(part) for part in capability.split(".")[:2])
        if have < BF16_MIN_CAPABILITY:
            raise BackendUnavailableError(
                f"this GPU (compute capability {capability}) has no BF16 tensor cores; BF16 needs "
                f"{'.'.join(map(str, BF16_MIN_CAPABILITY))} or later (Ampere, Ada, Hopper, "
                "Blackwell; Jetson Orin)", hint="use --precision fp16 on this GPU")


def tensor_types(model) -> dict[str, int]:
    """Every tensor's ONNX element type (graph inputs, outputs, initializers, and intermediate
    tensors once ONNX's type inference has run): what precision a mixed graph holds where."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def fp32_nodes(model) -> list[str]:
    """Nodes of a mixed FP16 ONNX graph that compute in FP32: those (besides Casts and the
    Identities that replace FP16 round trips) with an FP32 output once ONNX's type inference has
    run, i.e. the nodes the FP16 conversion kept in FP32."""
    import onnx

    types = tensor_types(model)
    return [node.name for node in model.graph.node if node.op_type not in ("Cast", "Identity")
            and any(types.get(out) == onnx.TensorProto.FLOAT for out in node.output)]


def pinned_layers(layer_names: list[str], nodes: list[str], graph_nodes: list[str]
                  ) -> list[str]:
    """Layers the ONNX parser made from ``nodes`` (of a graph whose nodes are ``graph_nodes``):
    it names a node's layer after the node and any further layer of the same node
    ``<node>_<n>`` (onnx-tensorrt ``ImporterContext::registerLayer``), so a layer named exactly
    like another node belongs to that node."""
    wanted, known = set(nodes), set(graph_nodes)
    pinned = []
    for name in layer_names:
        base, _, suffix = name.rpartition("_")
        if name in wanted or (name not in known and suffix.isdigit() and base in wanted):
            pinned.append(name)
    return pinned


def build_engine(onnx_path: Path, engine_path: Path, graph_inputs: dict, precision: str,
                 options: EngineOptions = EngineOptions(), depth: int = 1) -> list[Path]:
    """Build ``engine_path`` from ``onnx_path`` (+ a JSON sidecar recording TensorRT version,
    GPU, plan and profile, which the runtime checks before deserializing)."""
    trt = _tensorrt()
    plan = build_plan(trt.__version__, precision, options, is_jetson(), gpu_compute_capability())
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} could not parse {Path(onnx_path).name}: "
                          f"{errors}", hint="samedge doctor BUNDLE --target tensorrt-X.Y lists "
                                            "what this version's parser supports")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                 int(options.workspace_gib * 2**30))
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if plan.hardware_compatibility:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      plan.hardware_compatibility)
    pinned: list[str] = []
    if plan.pin_fp32:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        layers = {network.get_layer(i).name: network.get_layer(i)
                  for i in range(network.num_layers)}
        pinned = pinned_layers(list(layers), fp32_nodes(model), [n.name for n in model.graph.node])
        for name in pinned:
            layer = layers[name]
            layer.precision = trt.float32
            for index in range(layer.num_outputs):
                if layer.get_output(index).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(index, trt.float32)
    shapes = profile_shapes(graph_inputs, options, depth)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from "
                          f"{Path(onnx_path).name} (see TensorRT's log above)")
    engine_path.write_bytes(bytes(serialized))
    record = {
        "tensorrt_version": trt.__version__,
        "compute_capability": gpu_compute_capability(),
        "precision": precision,
        "built_from": Path(onnx_path).name,
        **asdict(plan),
        "fp32_pinned_layers": len(pinned),
        "version_compatible": options.version_compatible,
        "hardware_compatible": options.hardware_compatible,
        "workspace_gib": options.workspace_gib,
        "profile": {name: {"min": list(low), "opt": list(opt), "max": list(high)}
                    for name, (low, opt, high) in shapes.items()},
    }
    sidecar = engine_path.with_suffix(".json")
    sidecar.write_text(json.dumps(record, indent=2))
    return [engine_path, sidecar]
