"""OpenVINO IR INT8 through NNCF, with units that can be put back to float one at a time.

``nncf.quantize`` (``ModelType.TRANSFORMER``, ``MIXED`` preset: symmetric per-channel weights,
asymmetric activations) does the quantizing; this module only maps its result onto search units.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

import numpy as np

from samedge.export.openvino import opt_out_of_telemetry
from samedge.quantize.search import Unit, block_of

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
    behind (their measured effect on LiteMedSAM is in docs/performance.md).
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
