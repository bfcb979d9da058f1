"""Q/DQ INT8 ONNX, the explicit-quantization graph TensorRT builds INT8 engines from.

ONNX Runtime's ``quantize_static(quant_format=QDQ)`` with signed symmetric INT8 activations and
weights (zero points 0, as TensorRT requires) and per-channel weights. ONNX Runtime rather than
ModelOpt because ModelOpt's ONNX extra would replace this environment's onnx/onnxruntime
(docs/performance.md has the comparison).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Sequence

import numpy as np

from samedge.errors import DataSourceError

QDQ_OP_TYPES = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def initializers(model) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return names


def onnx_units(model, attention_matmuls: bool = False) -> list[str]:
    """Names of the nodes Q/DQ quantization covers: Conv/Gemm/ConvTranspose, and MatMul with a
    weight (attention's activation×activation MatMuls stay float unless ``attention_matmuls``)."""
    import onnx

    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    consts = initializers(model)
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
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

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
