"""Mixed BF16 ONNX for TensorRT, and the FP32 stand-in that measures it on a CPU.

TensorRT 10 and later builds BF16 kernels (Ampere and later GPUs, Orin included) from a strongly
typed graph whose tensors say bfloat16. ONNX Runtime's CPU provider has Cast to and from bfloat16
but no BF16 MatMul or Conv, so that graph cannot run here as it is. Its stand-in is the same graph
computing in FP32 on values rounded to BF16 wherever the BF16 graph holds a BF16 tensor (weights,
and every output of a BF16 node): what BF16 kernels accumulating in FP32 compute, up to summation
order and fused kernels that skip a rounding, so it errs on the pessimistic side. Which units
stay FP32 is searched like INT8's: the whole LiteMedSAM encoder in BF16 drifts beyond the INT8
gate (OpenVINO on a Sapphire Rapids Xeon, docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from samedge.quantize.fp16 import FP16_KEEP_OPS, fp32_reasons, mixed_fp16
from samedge.quantize.search import Unit, block_of

COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")  # what BF16 makes faster


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounded to nearest even as ONNX's Cast does;
    NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def bf16_values(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (still float32)."""
    return (bf16_bits(values).astype(np.uint32) << 16).view(np.float32)


def bf16_untyped(model) -> dict[str, str]:
    """Nodes whose op, at the graph's opset, has no bfloat16 in the type that carries its float
    data (Conv before opset 22): in BF16 the graph would not be valid ONNX, so they stay FP32."""
    import onnx

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=17)
    verdict: dict[str, bool] = {}
    reasons = {}
    for node in model.graph.node:
        if node.op_type not in verdict:
            try:
                schema = onnx.defs.get_schema(node.op_type, opset)
            except onnx.defs.SchemaError:
                verdict[node.op_type] = True
            else:
                floats = [c.allowed_type_strs for c in schema.type_constraints
                          if "tensor(float)" in c.allowed_type_strs]
                verdict[node.op_type] = all("tensor(bfloat16)" in t for t in floats)
        if not verdict[node.op_type]:
            reasons[node.name] = f"{node.op_type} has no BF16 at opset {opset}"
    return reasons


class OnnxBf16:
    """An FP32 ONNX graph whose compute units can each run in BF16 or FP32 (nodes in no unit stay
    FP32); LayerNorm, softmax, decomposed norms, residual adds and ops without BF16 at the graph's
    opset are FP32 in every unit.

    :meth:`graph` is the BF16 graph TensorRT builds, :meth:`realize` its FP32 stand-in (what the
    accuracy search and ONNX Runtime measure). ``granularity="block"`` makes a whole block one
    unit (its elementwise ops follow it); ``"op"`` one MatMul/Gemm/Conv each."""

    def __init__(self, source: Path | Any, granularity: str = "block"):
        import onnx

        if granularity not in ("op", "block"):
            raise ValueError(f"granularity {granularity!r}: use 'op' or 'block'")
        self.model = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source))
        self.fixed = fp32_reasons(self.model)
        for name, why in bf16_untyped(self.model).items():
            self.fixed.setdefault(name, why)
        compute = [n for n in self.model.graph.node
                   if n.op_type in COMPUTE_OPS and n.name not in self.fixed]
        units: dict[str, Unit] = {}
        if granularity == "op":
            for node in compute:
                units[node.name] = Unit(node.name, node.op_type, members=(node.name,))
        else:
            for block in dict.fromkeys(block_of(n.name) for n in compute):
                members = tuple(n.name for n in self.model.graph.node
                                if block_of(n.name) == block and n.name not in self.fixed)
                units[block] = Unit(block, "block", members=members)
        self.units = units

    def kept(self, bf16: Collection[str]) -> dict[str, str]:
        """Every node that computes in FP32 when the units ``bf16`` run BF16, with why: all but
        those units' members, so nothing the search did not choose leaves FP32."""
        chosen = {member for name in bf16 for member in self.units[name].members}
        searched = {member for unit in self.units.values() for member in unit.members}
        reasons = {}
        for node in self.model.graph.node:
            if node.name not in chosen:
                reasons[node.name] = self.fixed.get(node.name, (
                    "kept FP32 by the accuracy search" if node.name in searched
                    else "in no searched unit"))
        return reasons

    def graph(self, bf16: Collection[str]):
        """The BF16 graph: FP32 I/O, BF16 in the units ``bf16`` (and their weights)."""
        return retype_bf16(mixed_fp16(self.model, self.kept(bf16), FP16_KEEP_OPS), self.model)

    def realize(self, bf16: Collection[str]):
        return stand_in(self.graph(bf16))


# -- FP16 graph → BF16 graph → FP32 stand-in --------------------------------------------------
def _float_originals(model) -> dict[str, np.ndarray]:
    """FP32 initializers and Constant tensors by name: BF16 weights are rounded from these, not
    from FP16 (which would round twice and clip at 65504)."""
    from onnx import TensorProto, numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
             if t.data_type == TensorProto.FLOAT}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                    found[node.output[0]] = numpy_helper.to_array(attribute.t)
    return found


def _bf16_tensor(tensor, original: np.ndarray | None):
    """``tensor`` (FP16) as BF16, rounded from its FP32 original where there is one."""
    from onnx import TensorProto, numpy_helper

    values = original if original is not None else \
        numpy_helper.to_array(tensor).astype(np.float32)
    tensor.ClearField("float_data")
    tensor.ClearField("int32_data")
    tensor.data_type = TensorProto.BFLOAT16
    tensor.raw_data = bf16_bits(values.reshape(tuple(tensor.dims))).tobytes()


def retype_bf16(fp16_model, fp32_model):
    """The mixed FP16 graph with every FLOAT16 tensor, Cast and weight in BFLOAT16 (weights
    rounded from the FP32 graph's): same structure, BF16's range, so nothing FP16 kept for range
    is needed here — only the precision choices carry over."""
    from onnx import TensorProto

    f16, b16 = TensorProto.FLOAT16, TensorProto.BFLOAT16
    originals = _float_originals(fp32_model)
    graph = fp16_model.graph
    for tensor in graph.initializer:
        if tensor.data_type == f16:
            _bf16_tensor(tensor, originals.get(tensor.name))
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name in ("to", "dtype") and attribute.i == f16:
                attribute.i = b16
            if attribute.t.data_type == f16:
                _bf16_tensor(attribute.t, originals.get(node.output[0])
                             if node.op_type == "Constant" else None)
    for info in (*graph.value_info, *graph.input, *graph.output):
        if info.type.tensor_type.elem_type == f16:
            info.type.tensor_type.elem_type = b16
    return fp16_model


def stand_in(bf16_model):
    """The BF16 graph computing in FP32: BF16 weights become FP32 holding the same values, and
    each BF16 tensor a node produces is rounded through a Cast to BF16 and back, so every value
    the BF16 graph would hold in BF16 is a BF16 value here too."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32, b16 = TensorProto.FLOAT, TensorProto.BFLOAT16
    model = onnx.shape_inference.infer_shapes(bf16_model)  # a type for every tensor
    graph = model.graph
    bf16_tensors = {v.name for v in graph.value_info if v.type.tensor_type.elem_type == b16}
    for tensor in graph.initializer:
        if tensor.data_type == b16:
            tensor.CopyFrom(numpy_helper.from_array(_bf16_array(tensor), tensor.name))
    nodes = []
    for node in graph.node:
        rounds = [name for name in node.output if name in bf16_tensors]
        for attribute in node.attribute:
            if attribute.name in ("to", "dtype") and attribute.i == b16:
                attribute.i = f32
            if attribute.t.data_type == b16:
                attribute.t.CopyFrom(numpy_helper.from_array(_bf16_array(attribute.t),
                                                             attribute.t.name))
        nodes.append(node)
        for index, name in enumerate(node.output):
            if name in rounds:
                node.output[index] = f"{name}/fp32"
                nodes += [helper.make_node("Cast", [f"{name}/fp32"], [f"{name}/bf16"], to=b16,
                                           name=f"{node.name}/round_bf16"),
                          helper.make_node("Cast", [f"{name}/bf16"], [name], to=f32,
                                           name=f"{node.name}/round_bf16_back")]
    del graph.node[:]
    graph.node.extend(nodes)
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == b16:
            info.type.tensor_type.elem_type = f32
    return model


def _bf16_array(tensor) -> np.ndarray:
    bits = np.frombuffer(tensor.raw_data, dtype=np.uint16) if tensor.raw_data else \
        np.asarray(tensor.int32_data, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(tensor.dims))
