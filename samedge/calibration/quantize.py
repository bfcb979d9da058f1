"""INT8 and FP16 variants of the exported graphs, and the accuracy-controlled search between them.

Tools (no quantizer is written here):

* **OpenVINO IR INT8**: NNCF post-training quantization (``nncf.quantize`` with
  ``ModelType.TRANSFORMER`` and the ``MIXED`` preset: symmetric per-channel weights, asymmetric
  activations), on tensors from :class:`~samedge.calibration.calibset.CalibrationSet`.
* **Q/DQ INT8 ONNX** (the explicit-quantization graph TensorRT builds INT8 engines from): ONNX
  Runtime's quantizer, ``quantize_static(quant_format=QDQ)`` with signed INT8 and symmetric
  activations *and* weights (all zero points 0, as TensorRT requires), per-channel weights.
* **Mixed FP16 ONNX** (what a strongly-typed TensorRT build consumes): ONNX Runtime's
  ``float16.convert_float_to_float16`` with LayerNorm, Softmax, decomposed norms, residual adds,
  sin/cos positional encodings and every node whose FP32 output exceeds the FP16-safe range on real
  calibration data kept in FP32 (the rules of NVIDIA ModelOpt's AutoCast).

Why ONNX Runtime's tools and not ModelOpt: ``nvidia-modelopt[onnx]`` pins ``onnx~=1.21``,
``onnxruntime-gpu~=1.24`` and ``cupy-cuda12x``, which would replace this environment's onnx 1.23 and
CPU onnxruntime 1.31; ONNX Runtime is already the validation runtime, its Q/DQ output is the format
TensorRT's ONNX parser documents, and both graphs are validated here on ORT CPU with the same
drift metrics as every other variant. NNCF on ONNX was the other candidate; its ONNX backend emits
asymmetric UINT8 activations unless forced, so ORT's explicit symmetric switch is the simpler match.

**Accuracy control.** Naive INT8 of LiteMedSAM drifts far (mean Dice vs FP32 ≈ 0.9): the
full-resolution first stage and the RGB-replicated grey input make early layers very sensitive.
:func:`accuracy_search` therefore reverts quantized ops to float until the gate holds, using the
real metric (Dice of the runtime's masks vs FP32 PyTorch) for decisions and a cheap proxy
(relative embedding error with only one op quantized, on a few slices) to order the candidates.
Quantization errors of independent ops add up nearly in quadrature here (measured: the sum of
single-op squared errors predicts the all-INT8 error within 10 %), so ordering by single-op error
and bisecting over how many to revert finds the float set in ~log2(n) real evaluations. Mask Dice
is far less forgiving than the embedding error: on LiteMedSAM the target (mean >= 0.99, worst
>= 0.95) still needs about 68 of 79 units in float (figures in the README). A unit is an op together
with every op that reads one of its input quantizers (see :class:`Unit`), so reverting it really
removes that INT8 rounding.
``nncf.quantize_with_accuracy_control`` is available as ``method="nncf"`` (same metric through
``validation_fn``); it ranks by reverting one group at a time and is several times slower here.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import numpy as np

from samedge.errors import DataSourceError
from samedge.export.openvino import opt_out_of_telemetry

# -------------------------------------------------------------------------------------------------
# OpenVINO / NNCF
# -------------------------------------------------------------------------------------------------

# Ops whose int8 weights NNCF compresses, and ops a quantizer passes through to its consumer.
_OV_WEIGHTED = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData",
                "GroupConvolutionBackpropData"}
_OV_AGNOSTIC = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "VariadicSplit", "Split", "Concat",
                "Pad", "Slice", "StridedSlice", "Gather", "Convert", "Broadcast", "MaxPool",
                "ShuffleChannels", "DepthToSpace", "SpaceToDepth"}
_OV_WEIGHT_CHAIN = {"Multiply", "Convert", "Subtract", "Reshape", "Transpose", "Unsqueeze"}


@dataclass
class NncfConfig:
    """NNCF post-training quantization settings (recorded in the manifest).

    SmoothQuant and bias correction are off by default: both rewrite float weights/biases around
    a quantized op, so reverting that op to float in the accuracy search would leave the rewrite
    behind; measured on LiteMedSAM they changed the all-INT8 embedding error by < 2 %.
    """

    preset: str = "mixed"
    model_type: str | None = "transformer"
    subset_size: int = 300
    fast_bias_correction: bool = True
    bias_correction: bool = False
    smooth_quant: bool = False
    ignored_names: tuple[str, ...] = ()
    ignored_types: tuple[str, ...] = ()
    ignored_patterns: tuple[str, ...] = ()

    def describe(self) -> dict:
        return {"tool": "nncf.quantize", **asdict(self)}

    def arguments(self) -> dict:
        opt_out_of_telemetry()
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )

        smooth = AdvancedSmoothQuantParameters() if self.smooth_quant else \
            AdvancedSmoothQuantParameters(matmul=-1, convolution=-1)
        advanced = AdvancedQuantizationParameters(
            smooth_quant_alphas=smooth, disable_bias_correction=not self.bias_correction)
        ignored = None
        if self.ignored_names or self.ignored_types or self.ignored_patterns:
            ignored = nncf.IgnoredScope(names=list(self.ignored_names),
                                        types=list(self.ignored_types),
                                        patterns=list(self.ignored_patterns), validate=False)
        return dict(
            preset={"mixed": nncf.QuantizationPreset.MIXED,
                    "performance": nncf.QuantizationPreset.PERFORMANCE}[self.preset],
            model_type=nncf.ModelType.TRANSFORMER if self.model_type == "transformer" else None,
            subset_size=self.subset_size, fast_bias_correction=self.fast_bias_correction,
            ignored_scope=ignored, advanced_parameters=advanced,
        )


def read_openvino(model: Any) -> Any:
    """An ``ov.Model`` from a model, an IR .xml or an ONNX file."""
    import openvino as ov

    if isinstance(model, ov.Model):
        return model
    return ov.Core().read_model(str(model))


def nncf_quantize(model: Any, feeds: Iterable[dict[str, np.ndarray]], config: NncfConfig) -> Any:
    """NNCF INT8 of an OpenVINO model (path or ``ov.Model``) on calibration feeds."""
    opt_out_of_telemetry()
    import nncf

    float_model = read_openvino(model)
    names = [port.get_any_name() for port in float_model.inputs]

    def transform(item: dict[str, np.ndarray]):
        return {name: item[name] for name in names}

    return nncf.quantize(float_model, nncf.Dataset(feeds, transform), **config.arguments())


@dataclass
class Unit:
    """What the accuracy search switches between INT8 and float as one: a quantized op, or the
    ops that read the same activation quantizer (q/k/v projections of one LayerNorm output) —
    one of them cannot go back to float alone while the quantizer stays for the others. With
    ``granularity="block"`` a unit is a whole block (``/layers.2/blocks.3/...``)."""

    name: str
    op_type: str
    quantizers: tuple[str, ...] = ()
    weight: bool = False
    members: tuple[str, ...] = ()


def block_of(op_name: str, depth: int = 2) -> str:
    """``/layers.2/blocks.3/mlp/fc1/MatMul`` → ``/layers.2/blocks.3`` (the module path's head)."""
    parts = [p for p in op_name.split("/") if p]
    return "/" + "/".join(parts[:depth]) if len(parts) > depth else op_name


def _consumers(output, agnostic: set[str]) -> list:
    """Non-agnostic ops reached from an output through quantization-agnostic ops."""
    found, queue, seen = [], deque([output]), set()
    while queue:
        for target in queue.popleft().get_target_inputs():
            node = target.get_node()
            key = node.get_friendly_name()
            if key in seen:
                continue
            seen.add(key)
            if node.get_type_name() in agnostic:
                queue.extend(node.outputs())
            elif node.get_type_name() != "Result":
                found.append(node)
    return found


def _weight_port(op) -> int | None:
    """The input port of a weighted op fed by a dequantization chain from an integer constant
    (port 1 for Conv and x @ W; port 0 when an exporter wrote W @ x)."""
    for port in range(min(op.get_input_size(), 2)):
        node = op.input_value(port).get_node()
        for _ in range(6):
            kind = node.get_type_name()
            if kind == "Constant":
                if node.get_element_type().is_integral():
                    return port
                break
            if kind == "FakeQuantize":
                if node.input_value(0).get_node().get_type_name() == "Constant":
                    return port
                break
            if kind not in _OV_WEIGHT_CHAIN:
                break
            node = node.input_value(0).get_node()
    return None


def _float_weight(op, port: int) -> np.ndarray | None:
    """The FP32 weight on ``port`` of a float model's op (a Constant, possibly behind a Convert)."""
    if op.get_input_size() <= port:
        return None
    node = op.input_value(port).get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data(), dtype=np.float32)


class OpenVinoMixed:
    """An NNCF-quantized model whose units (see :class:`Unit`) can be put back to float.

    Reverting a unit restores its ops' FP32 weights and bypasses the activation quantizers that
    feed only reverted ops: the model NNCF's accuracy control produces, without re-running
    calibration. Units are closed under shared quantizers, so a reverted op never reads an INT8
    activation that a quantized neighbour keeps alive (``ops``: the individual quantized ops).
    """

    def __init__(self, float_model: Any, quantized: Any, granularity: str = "op"):
        if granularity not in ("op", "block"):
            raise ValueError(f"granularity {granularity!r}: use 'op' or 'block'")
        self.granularity = granularity
        self.float_model = read_openvino(float_model)
        self.quantized = quantized
        float_ops = {op.get_friendly_name(): op for op in self.float_model.get_ordered_ops()
                     if op.get_type_name() in _OV_WEIGHTED}
        weights: dict[str, tuple[int, np.ndarray]] = {}
        for op in quantized.get_ordered_ops():
            name = op.get_friendly_name()
            if op.get_type_name() in _OV_WEIGHTED and name in float_ops:
                port = _weight_port(op)
                weight = None if port is None else _float_weight(float_ops[name], port)
                if weight is not None:
                    weights[name] = (port, weight)
        self._weights = weights
        units: dict[str, Unit] = {}
        self._fq_consumers: dict[str, list[str]] = {}
        for op in quantized.get_ordered_ops():
            kind = op.get_type_name()
            if kind == "FakeQuantize":
                if op.input_value(0).get_node().get_type_name() == "Constant":
                    continue  # a weight quantizer: belongs to its op's weight
                consumers = _consumers(op.output(0), _OV_AGNOSTIC)
                names = [c.get_friendly_name() for c in consumers]
                self._fq_consumers[op.get_friendly_name()] = names
                for consumer in consumers:
                    unit = units.setdefault(consumer.get_friendly_name(),
                                            Unit(consumer.get_friendly_name(),
                                                 consumer.get_type_name()))
                    unit.quantizers += (op.get_friendly_name(),)
            elif kind in _OV_WEIGHTED and op.get_friendly_name() in weights:
                unit = units.setdefault(op.get_friendly_name(), Unit(op.get_friendly_name(), kind))
                unit.weight = True
        order = {op.get_friendly_name(): i for i, op in enumerate(quantized.get_ordered_ops())}
        self.ops = dict(sorted(units.items(), key=lambda kv: order.get(kv[0], 0)))
        self.units = self._group(order)

    def _group(self, order: Mapping[str, int]) -> dict[str, Unit]:
        """Units closed under shared quantizers (union-find over the ops each activation
        quantizer feeds), merged per block for ``granularity="block"``."""
        parent = {name: name for name in self.ops}

        def find(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        def union(a: str, b: str) -> None:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb, key=lambda n: order.get(n, 0))] = min(
                    ra, rb, key=lambda n: order.get(n, 0))

        for consumers in self._fq_consumers.values():
            names = [c for c in consumers if c in parent]
            for other in names[1:]:
                union(names[0], other)
        if self.granularity == "block":
            first: dict[str, str] = {}
            for name in self.ops:
                union(first.setdefault(block_of(name), name), name)
        members: dict[str, list[str]] = {}
        for name in self.ops:
            members.setdefault(find(name), []).append(name)
        units = {}
        for root, names in sorted(members.items(), key=lambda kv: order.get(kv[0], 0)):
            ops = [self.ops[n] for n in names]
            label = root if len(names) == 1 else (
                block_of(root) if self.granularity == "block" else f"{root} (+{len(names) - 1})")
            units[label] = Unit(label, ops[0].op_type,
                                tuple(dict.fromkeys(q for op in ops for q in op.quantizers)),
                                any(op.weight for op in ops), tuple(names))
        return units

    def realize(self, int8: Collection[str]) -> Any:
        """A copy in which only the ``int8`` units stay quantized."""
        import openvino as ov

        keep = {op for name in int8 for op in self.units[name].members}
        model = self.quantized.clone()
        ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        for name, unit in self.ops.items():
            if name in keep or not unit.weight:
                continue
            port, weight = self._weights[name]
            ops[name].input(port).replace_source_output(ov.op.Constant(weight).output(0))
        for fq_name, consumers in self._fq_consumers.items():
            if not any(c in keep for c in consumers):
                fq = ops[fq_name]
                fq.output(0).replace(fq.input_value(0))
        model.validate_nodes_and_infer_types()
        return model


def save_openvino(model: Any, xml: Path) -> list[Path]:
    """Write an IR (weights as they are: int8 where quantized, FP32 elsewhere)."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return [xml, xml.with_suffix(".bin")]


# -------------------------------------------------------------------------------------------------
# ONNX: Q/DQ INT8 (ONNX Runtime quantizer) and mixed FP16
# -------------------------------------------------------------------------------------------------

QDQ_OP_TYPES = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def _initializers(model) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return names


def onnx_units(model, attention_matmuls: bool = False) -> list[str]:
    """Names of the nodes Q/DQ quantization covers: Conv/Gemm/ConvTranspose, and MatMul with a
    weight (attention's activation×activation MatMuls stay float unless ``attention_matmuls``)."""
    import onnx

    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    consts = _initializers(model)
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OP_TYPES:
            continue
        if node.op_type == "MatMul":
            weights = [i for i in node.input if i in consts]
            if not weights and not attention_matmuls:
                continue
            # batched constant weights (B, K, N): per-channel Q/DQ has no axis ORT or TensorRT
            # fuse; they stay float
            if weights and any(ranks.get(w, 2) != 2 for w in weights):
                continue
        names.append(node.name)
    return names


class _FeedReader:
    """ONNX Runtime calibration reader over a list of feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], names: Sequence[str]):
        self._iter, self._names = iter(feeds), list(names)

    def get_next(self):
        item = next(self._iter, None)
        return None if item is None else {name: item[name] for name in self._names}


@dataclass
class OrtCalibration:
    """Activation ranges from ONNX Runtime's calibrator, cached as its JSON file."""

    cache: Path
    method: str
    slices: int
    seconds: float


def calibrate_onnx(onnx_path: Path, feeds: Iterable[dict[str, np.ndarray]], cache: Path,
                   method: str = "minmax", op_types: Sequence[str] = QDQ_OP_TYPES,
                   steps=None) -> OrtCalibration:
    """Collect activation ranges one feed at a time (ORT's ``CalibMaxIntermediateOutputs``
    drops data in ORT 1.31, and keeping every intermediate of 300 slices would not fit)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"calibration method {method!r}: use one of {sorted(methods)}")
    start = time.perf_counter()
    names = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]
    count = 0
    with tempfile.TemporaryDirectory(prefix="samedge-calib-") as tmp:
        calibrator = create_calibrator(Path(onnx_path), list(op_types),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=methods[method],
                                       extra_options={"symmetric": True} if method == "minmax"
                                       else {"percentile": 99.999} if method == "percentile"
                                       else {})
        iterator = feeds if steps is None else steps.track(feeds, "ORT calibration",
                                                           total=len(feeds))
        for feed in iterator:
            calibrator.collect_data(_FeedReader([feed], names))
            count += 1
        if count == 0:
            raise DataSourceError("no calibration feeds", hint="the calibration set is empty")
        ranges = calibrator.compute_data()
        del calibrator
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_data(ranges, cache)
    return OrtCalibration(cache, method, count, time.perf_counter() - start)


def quantize_qdq(onnx_path: Path, out_path: Path, calibration: OrtCalibration,
                 exclude: Collection[str] = (), op_types: Sequence[str] = QDQ_OP_TYPES,
                 attention_matmuls: bool = False) -> Path:
    """Explicit Q/DQ INT8 ONNX, symmetric signed INT8 everywhere (zero points 0: TensorRT's
    scheme), per-channel weights, one Q/DQ pair per consumer; ``exclude`` stays float. Biases stay
    float (TensorRT fuses them; it has no INT32 DequantizeLinear)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(onnx_path))
    units = set(onnx_units(model, attention_matmuls))
    excluded = [n.name for n in model.graph.node
                if n.op_type in op_types and (n.name in exclude or n.name not in units)]
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw = out_path.with_name(f".{out_path.name}.ort-{os.getpid()}")
    quantize_static(
        str(onnx_path), str(raw), None, quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types), nodes_to_exclude=excluded, per_channel=True,
        reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=methods[calibration.method],
        calibration_cache_path=str(calibration.cache),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       "DedicatedQDQPair": True, "QuantizeBias": False},
    )
    quantized = onnx.load(str(raw))
    raw.unlink()
    keep = {n.name for n in model.graph.node if n.op_type in op_types and n.name not in excluded}
    float_consumers_only(quantized, model, keep)
    onnx.save(quantized, str(out_path))
    return out_path


def float_consumers_only(model, float_model, quantized_nodes: Collection[str]) -> None:
    """Give every node that is not quantized its float input back.

    ORT's QDQ quantizer rewires *all* consumers of a quantized tensor to the DequantizeLinear
    output, so residual adds, ReLUs and reshapes would see INT8-rounded values. Explicit
    quantization for TensorRT places Q/DQ only in front of the compute ops (ModelOpt's default);
    other consumers read the float tensor (activation: the QuantizeLinear's input; weight: the
    float initializer), and Q/DQ nodes left without readers are dropped.
    """
    import onnx

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    added: set[str] = set()
    for node in graph.node:
        if node.name in quantized_nodes or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = dq.input[0]
            q = producers.get(source)
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
                continue
            original = source[: -len("_quantized")] if source.endswith("_quantized") else source
            if original in float_inits:
                fresh = f"{original}__fp32"
                if fresh not in added:
                    init = onnx.TensorProto()
                    init.CopyFrom(float_inits[original])
                    init.name = fresh
                    graph.initializer.append(init)
                    added.add(fresh)
                node.input[index] = fresh
    _prune(model)


def qdq_report(path_or_model) -> dict:
    """Facts TensorRT cares about: Q/DQ counts, zero-point dtypes/values, quantized nodes."""
    import onnx
    from onnx import numpy_helper

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) \
        else onnx.load(str(path_or_model))
    inits = {i.name: i for i in model.graph.initializer}
    zero_points, dtypes = [], set()
    quantized = set()
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is not None:
                array = numpy_helper.to_array(zp)
                zero_points.append(int(np.abs(array).max()) if array.size else 0)
                dtypes.add(array.dtype.name)
        if any(i in dq_outputs for i in node.input) and node.op_type not in (
                "QuantizeLinear", "DequantizeLinear"):
            quantized.add(node.name)
    counts = defaultdict(int)
    for node in model.graph.node:
        counts[node.op_type] += node.op_type in ("QuantizeLinear", "DequantizeLinear")
    return {
        "quantize_linear": counts["QuantizeLinear"],
        "dequantize_linear": counts["DequantizeLinear"],
        "zero_point_dtypes": sorted(dtypes),
        "zero_point_max_abs": max(zero_points, default=0),
        "symmetric_int8": dtypes <= {"int8"} and max(zero_points, default=0) == 0,
        "quantized_nodes": sorted(quantized),
    }


class OnnxMixed:
    """A fully Q/DQ-quantized ONNX graph whose nodes can be put back to float one by one
    (the node's inputs are re-pointed at the float graph's tensors; dead Q/DQ nodes dropped)."""

    def __init__(self, float_path: Path, qdq_path: Path):
        import onnx

        self.float_model = onnx.load(str(float_path))
        self.quantized = onnx.load(str(qdq_path))
        self._float_inputs = {n.name: list(n.input) for n in self.float_model.graph.node}
        self._float_inits = {i.name: i for i in self.float_model.graph.initializer}
        report = qdq_report(self.quantized)
        self.units = [n for n in onnx_units(self.float_model, attention_matmuls=True)
                      if n in report["quantized_nodes"]]

    def realize(self, int8: Collection[str]):
        import onnx

        keep = set(int8)
        model = onnx.ModelProto()
        model.CopyFrom(self.quantized)
        graph = model.graph
        added: set[str] = set()
        for node in graph.node:
            if node.name in self.units and node.name not in keep:
                inputs = []
                for name in self._float_inputs[node.name]:
                    if name in self._float_inits:
                        # the Q/DQ graph may reuse the name for a DequantizeLinear output
                        fresh = f"{name}__fp32"
                        if fresh not in added:
                            init = onnx.TensorProto()
                            init.CopyFrom(self._float_inits[name])
                            init.name = fresh
                            graph.initializer.append(init)
                            added.add(fresh)
                        name = fresh
                    inputs.append(name)
                del node.input[:]
                node.input.extend(inputs)
        _prune(model)
        return model


def _prune(model) -> None:
    """Drop nodes and initializers nothing reads any more."""
    graph = model.graph
    while True:
        used = {o.name for o in graph.output}
        for node in graph.node:
            used.update(node.input)
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


# -- FP16 -----------------------------------------------------------------------------------------
FP16_KEEP_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Sin", "Cos",
                 "Exp", "Log", "Reciprocal", "Range", "CumSum", "Resize")
FP16_DATA_MAX = 512.0  # ModelOpt AutoCast's default: activations above it stay FP32


def residual_adds(model) -> list[str]:
    """Add nodes whose two inputs are both activations (residual connections, attention biases)."""
    consts = _initializers(model)
    return [n.name for n in model.graph.node
            if n.op_type == "Add" and len(n.input) == 2 and not any(i in consts for i in n.input)]


def norm_nodes(model) -> list[str]:
    """Sub/Div of decomposed normalisations (``x - mean(x)``, ``… / sqrt(var + eps)``)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names = []
    for node in model.graph.node:
        sources = [producers.get(i) for i in node.input]
        kinds = {s.op_type for s in sources if s is not None}
        if (node.op_type == "Sub" and "ReduceMean" in kinds) or \
                (node.op_type == "Div" and "Sqrt" in kinds):
            names.append(node.name)
    return names


OUTPUT_BUDGET = 150_000_000  # float elements of intermediate outputs fetched per run (~600 MB)


def _output_chunks(model, nodes: Sequence, budget: int = OUTPUT_BUDGET,
                   dynamic: int = 16) -> list[list]:
    """Split ``nodes`` so that the outputs fetched in one run stay within ``budget`` elements
    (sizes from ONNX shape inference, dynamic axes counted as ``dynamic``): the encoder's
    full-resolution first stage needs small chunks, the decoder fits in one."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: [d.dim_value or dynamic for d in v.type.tensor_type.shape.dim]
                  for v in inferred.graph.value_info}
    except Exception:  # shape inference is only an estimate here
        shapes = {}
    chunks, current, used = [], [], 0
    for node in nodes:
        size = int(np.prod(shapes.get(node.output[0], [4_000_000]) or [1]))
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(node)
        used += size
    if current:
        chunks.append(current)
    return chunks


def _probe_session(model, outputs: Sequence[str]):
    """An ORT session of ``model`` returning the given intermediate tensors, unoptimised so every
    node's output still exists."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(probe.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def large_value_nodes(model, feeds: Iterable[dict[str, np.ndarray]],
                      data_max: float = FP16_DATA_MAX) -> dict[str, float]:
    """Nodes whose FP32 output magnitude exceeds ``data_max`` on real feeds (AutoCast's rule)."""
    float_nodes = [n for n in model.graph.node
                   if n.op_type not in ("Constant", "Shape", "Cast", "Equal", "Where")]
    peaks: dict[str, float] = {}
    feeds = list(feeds)
    names = [i.name for i in model.graph.input]
    for part in _output_chunks(model, float_nodes):
        outputs = {n.output[0]: n.name for n in part}
        session = _probe_session(model, list(outputs))
        for feed in feeds:
            for name, value in zip(outputs, session.run(None, {k: feed[k] for k in names})):
                value = np.asarray(value)
                if value.dtype.kind == "f" and value.size:
                    peaks[outputs[name]] = max(peaks.get(outputs[name], 0.0),
                                               float(np.abs(value).max()))
    return {k: v for k, v in peaks.items() if v > data_max}


@dataclass
class Fp16Conversion:
    path: Path
    kept_fp32: list[str]
    reasons: dict[str, str]


def convert_fp16(onnx_path: Path, out_path: Path, feeds: Iterable[dict] | None = None,
                 keep_ops: Sequence[str] = FP16_KEEP_OPS, keep_nodes: Collection[str] = (),
                 keep_residual_adds: bool = True, data_max: float = FP16_DATA_MAX
                 ) -> Fp16Conversion:
    """Mixed FP16 ONNX: FP32 I/O, FP16 elsewhere except the overflow-prone nodes."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(onnx_path))
    reasons: dict[str, str] = {name: "requested" for name in keep_nodes}
    for node in model.graph.node:
        if node.op_type in keep_ops:
            reasons.setdefault(node.name, f"op type {node.op_type}")
    if keep_residual_adds:
        for name in residual_adds(model):
            reasons.setdefault(name, "residual add")
    for name in norm_nodes(model):
        reasons.setdefault(name, "decomposed normalisation")
    if feeds is not None:
        for name, peak in large_value_nodes(model, feeds, data_max).items():
            reasons.setdefault(name, f"|output| {peak:.0f} > {data_max:.0f} on calibration data")
    converted = convert_float_to_float16(
        model, keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_ops),
        node_block_list=sorted(reasons))
    _unique_node_names(converted)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(out_path))
    return Fp16Conversion(out_path, sorted(reasons), reasons)


def _unique_node_names(model) -> None:
    """The converter inserts one Cast per blocked consumer of a tensor, all named after the
    tensor, so a tensor read by two FP32-kept nodes yields duplicate Casts (invalid ONNX): keep the
    first of identical Casts, number any other repeated node name."""
    outputs: dict[str, Any] = {}
    for node in list(model.graph.node):
        first = outputs.get(node.output[0]) if node.output else None
        if first is not None and node.op_type == first.op_type == "Cast" \
                and list(node.input) == list(first.input) and node.attribute == first.attribute:
            model.graph.node.remove(node)
            continue
        for name in node.output:
            outputs.setdefault(name, node)
    seen: dict[str, int] = {}
    for node in model.graph.node:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0


# -------------------------------------------------------------------------------------------------
# Per-layer error (Polygraphy-style comparison of intermediate outputs)
# -------------------------------------------------------------------------------------------------
@dataclass
class LayerError:
    name: str
    op_type: str
    index: int
    rel_err: float
    cosine: float


def _rel(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = max(np.linalg.norm(b64), 1e-12)
    cos = float(a64 @ b64 / max(np.linalg.norm(a64) * norm, 1e-12))
    return float(np.linalg.norm(a64 - b64) / norm), cos


def onnx_layer_errors(float_path: Path, variant, feeds: Sequence[dict[str, np.ndarray]],
                      op_types: Sequence[str] = ("Conv", "Gemm", "MatMul", "Add",
                                                 "LayerNormalization", "ConvTranspose"),
                      budget: int = OUTPUT_BUDGET // 2, max_layers: int = 400) -> list[LayerError]:
    """Relative error of each layer's output, variant vs FP32, both on ONNX Runtime CPU.

    The tensors are the float graph's node outputs (the variant keeps their names: Q/DQ
    insertion and FP16 casts rename only the tensors they add). Run in chunks of outputs so that
    full-resolution activations of a 256² first stage never sit in memory all at once.
    """
    import onnx

    base = onnx.load(str(float_path))
    other = variant if isinstance(variant, onnx.ModelProto) else onnx.load(str(variant))
    present = {o for n in other.graph.node for o in n.output}
    nodes = [(i, n) for i, n in enumerate(base.graph.node)
             if n.op_type in op_types and n.output[0] in present][:max_layers]
    names = [i.name for i in base.graph.input]
    errors: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for part in _output_chunks(base, [n for _, n in nodes], budget):
        outputs = [n.output[0] for n in part]
        a, b = _probe_session(base, outputs), _probe_session(other, outputs)
        for feed in feeds:
            inputs = {k: feed[k] for k in names}
            for node, x, y in zip(part, a.run(None, inputs), b.run(None, inputs)):
                errors[node.name].append(_rel(np.asarray(y, np.float32),
                                              np.asarray(x, np.float32)))
    return [LayerError(n.name, n.op_type, i, float(np.mean([e[0] for e in errors[n.name]])),
                       float(np.min([e[1] for e in errors[n.name]])))
            for i, n in nodes]


def openvino_layer_errors(float_model, variant, feeds: Sequence[dict[str, np.ndarray]],
                          op_types: Sequence[str] = ("Convolution", "GroupConvolution", "MatMul",
                                                     "Add", "MVN", "ScaledDotProductAttention"),
                          chunk: int = 16, threads: int | None = None) -> list[LayerError]:
    """The same comparison on OpenVINO (op outputs matched by friendly name)."""
    import openvino as ov

    base, other = read_openvino(float_model), read_openvino(variant)
    in_other = {op.get_friendly_name() for op in other.get_ordered_ops()}
    nodes = [(i, op.get_friendly_name(), op.get_type_name())
             for i, op in enumerate(base.get_ordered_ops())
             if op.get_type_name() in op_types and op.get_friendly_name() in in_other]
    errors: dict[str, list[tuple[float, float]]] = defaultdict(list)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads

    def compiled(model, names):
        probe = model.clone()
        ops = {op.get_friendly_name(): op for op in probe.get_ordered_ops()}
        for result in list(probe.get_results()):
            probe.remove_result(result)
        for name in names:
            probe.add_results([ov.op.Result(ops[name].output(0))])
        return core.compile_model(probe, "CPU", config)

    for start in range(0, len(nodes), chunk):
        part = nodes[start:start + chunk]
        names = [n for _, n, _ in part]
        a, b = compiled(base, names), compiled(other, names)
        for feed in feeds:
            inputs = {p.get_any_name(): feed[p.get_any_name()] for p in base.inputs}
            ra = a.create_infer_request().infer(inputs)
            rb = b.create_infer_request().infer(inputs)
            for k, name in enumerate(names):
                x = np.asarray(ra[a.outputs[k]], np.float32)
                y = np.asarray(rb[b.outputs[k]], np.float32)
                errors[name].append(_rel(y, x))
    return [LayerError(n, t, i, float(np.mean([e[0] for e in errors[n]])),
                       float(np.min([e[1] for e in errors[n]]))) for i, n, t in nodes
            if errors[n]]


# -------------------------------------------------------------------------------------------------
# Accuracy-controlled search
# -------------------------------------------------------------------------------------------------
@dataclass
class SearchStep:
    float_units: int
    dice_mean: float
    dice_min: float
    passed: bool
    seconds: float


@dataclass
class SearchResult:
    """What the search decided and why (goes into the manifest and the report)."""

    int8_units: list[str]
    float_units: list[str]
    sensitivity: dict[str, float]
    steps: list[SearchStep] = field(default_factory=list)
    passed: bool = False
    summary: dict = field(default_factory=dict)
    ranking_seconds: float = 0.0
    search_seconds: float = 0.0
    method: str = "search"

    def describe(self, top: int = 25) -> dict:
        ranked = sorted(self.sensitivity.items(), key=lambda kv: -kv[1])
        total = sum(self.sensitivity.values())
        return {
            "method": self.method,
            "passed": self.passed,
            "units": len(self.int8_units) + len(self.float_units),
            "int8_units": len(self.int8_units),
            "float_units": self.float_units,
            "most_sensitive": [{"op": name, "rel_err_sq": value,
                                "share": value / total if total else 0.0}
                               for name, value in ranked[:top]],
            "steps": [asdict(s) for s in self.steps],
            "ranking_seconds": self.ranking_seconds,
            "search_seconds": self.search_seconds,
        }


def rank_units(units: Sequence[str], realize: Callable[[Collection[str]], Any],
               proxy_error: Callable[[Any], float], steps=None) -> dict[str, float]:
    """Squared relative output error with only one unit quantized, for every unit."""
    scores = {}
    iterator = units if steps is None else steps.track(units, "rank ops by INT8 error",
                                                       total=len(units))
    for name in iterator:
        scores[name] = float(proxy_error(realize([name])))
    return scores


def accuracy_search(units: Sequence[str], realize: Callable[[Collection[str]], Any],
                    measure: Callable[[Any], dict], passes: Callable[[dict], bool],
                    sensitivity: Mapping[str, float], steps=None,
                    max_evaluations: int = 10) -> tuple[Any, SearchResult]:
    """Fewest float units (in sensitivity order) for which ``passes(measure(model))``.

    Bisection over k, the number of most sensitive units reverted: k = 0 is full INT8, k = n is
    the float model (passes by definition, never measured). Returns the passing model with the
    smallest k found and the record; when even small k fail and evaluations run out, the best
    passing model found so far (or the float-most one measured) is returned with ``passed`` set.
    """
    order = sorted(units, key=lambda u: -sensitivity.get(u, 0.0))
    history: list[SearchStep] = []
    start = time.perf_counter()
    cache: dict[int, tuple[Any, dict, bool]] = {}

    def evaluate(k: int):
        if k in cache:
            return cache[k]
        t0 = time.perf_counter()
        model = realize(order[k:])
        summary = measure(model)
        ok = bool(passes(summary))
        history.append(SearchStep(k, summary["dice_mean"], summary["dice_min"], ok,
                                  time.perf_counter() - t0))
        if steps is not None:
            steps.info(f"  {k:3d} units in float: mean Dice {summary['dice_mean']:.4f}, worst "
                       f"{summary['dice_min']:.4f} → {'pass' if ok else 'fail'}")
        cache[k] = (model, summary, ok)
        return cache[k]

    n = len(order)
    lo, hi = -1, None  # lo: largest k known to fail; hi: smallest k known to pass
    model, summary, ok = evaluate(0)
    if ok:
        hi = 0
    else:
        lo = 0
        # Guess from the additive error model: revert until the remaining error falls to 1/4.
        total = sum(sensitivity.get(u, 0.0) for u in order)
        remaining, guess = total, 0
        while guess < n and remaining > total / 16:
            remaining -= sensitivity.get(order[guess], 0.0)
            guess += 1
        probe = max(1, min(guess, n - 1))
        while len(history) < max_evaluations:
            model, summary, ok = evaluate(probe)
            if ok:
                hi = probe
            else:
                lo = probe
            if hi is None:
                if probe >= n - 1:
                    break
                probe = min(n - 1, max(probe + 1, probe * 2))
                continue
            if hi - lo <= 1:
                break
            probe = (lo + hi) // 2
    elapsed = time.perf_counter() - start
    if hi is None:
        k = max(cache)  # nothing passed: report the float-most measured model
        model, summary, ok = cache[k]
        passed = False
    else:
        k = hi
        model, summary, ok = cache[k]
        passed = True
    result = SearchResult(int8_units=order[k:], float_units=order[:k],
                          sensitivity=dict(sensitivity), steps=history, passed=passed,
                          summary=summary, search_seconds=elapsed)
    return model, result
