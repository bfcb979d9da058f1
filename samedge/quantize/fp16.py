"""Mixed FP16 ONNX, what a strongly typed TensorRT build consumes.

ONNX Runtime's ``convert_float_to_float16`` with the nodes NVIDIA ModelOpt's AutoCast keeps in FP32:
LayerNorm, Softmax, decomposed norms, residual adds, sin/cos encodings, and every node whose FP32
output on real calibration data exceeds the FP16-safe range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import numpy as np

from samedge.export.tensorrt import tensor_types
from samedge.quantize.onnx_qdq import initializers

# -- FP16 -----------------------------------------------------------------------------------------
FP16_KEEP_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Sin", "Cos",
                 "Exp", "Log", "Reciprocal", "Range", "CumSum", "Resize")


FP16_DATA_MAX = 512.0  # ModelOpt AutoCast's default: activations above it stay FP32


def residual_adds(model) -> list[str]:
    """Add nodes whose two inputs are both activations (residual connections, attention biases)."""
    consts = initializers(model)
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


def output_chunks(model, nodes: Sequence, budget: int = OUTPUT_BUDGET,
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


def probe_session(model, outputs: Sequence[str]):
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
    for part in output_chunks(model, float_nodes):
        outputs = {n.output[0]: n.name for n in part}
        session = probe_session(model, list(outputs))
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


def fp32_reasons(model, keep_ops: Sequence[str] = FP16_KEEP_OPS,
                 keep_residual_adds: bool = True) -> dict[str, str]:
    """Nodes kept FP32 whatever the data (op types, residual adds, decomposed norms), with why."""
    reasons: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in keep_ops:
            reasons.setdefault(node.name, f"op type {node.op_type}")
    if keep_residual_adds:
        for name in residual_adds(model):
            reasons.setdefault(name, "residual add")
    for name in norm_nodes(model):
        reasons.setdefault(name, "decomposed normalisation")
    return reasons


def mixed_fp16(model, keep_nodes: Collection[str], keep_ops: Sequence[str] = FP16_KEEP_OPS):
    """``model`` (not modified) with FP32 I/O and every float node in FP16 except ``keep_nodes``
    and ``keep_ops``, Casts between (ONNX Runtime's converter)."""
    import onnx
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    converted = convert_float_to_float16(
        copy, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_ops),
        node_block_list=sorted(keep_nodes))
    _unique_node_names(converted)
    _drop_round_trips(converted)
    _sort_topologically(converted.graph)
    return converted


def _drop_round_trips(model) -> None:
    """The converter passes a tensor between two FP32-kept nodes through FP16 and back (a
    residual Add feeding its LayerNorm, the graph input reaching a residual Add): FP32 nodes
    read the FP32 tensor instead. Readers of a Cast back to FLOAT of a Cast to FP16 of an FP32
    tensor read that tensor (an Identity where the Cast's output is a graph output); Casts
    nothing reads any more go."""
    import onnx

    FLOAT, low = onnx.TensorProto.FLOAT, (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    types = tensor_types(model)
    outputs = {o.name for o in model.graph.output}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) \
            if node.op_type == "Cast" else None

    producers = {out: node for node in model.graph.node for out in node.output}
    renamed: dict[str, str] = {}
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.input else None
        if cast_to(node) == FLOAT and source is not None and cast_to(source) in low \
                and types.get(source.input[0]) == FLOAT:
            if node.output[0] in outputs:
                node.op_type = "Identity"
                del node.attribute[:]
                node.input[0] = source.input[0]
            else:
                renamed[node.output[0]] = source.input[0]
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    nodes = list(model.graph.node)
    while True:  # a dropped Cast back may leave its Cast to FP16 unread
        read = {name for node in nodes for name in node.input} | outputs
        kept = [n for n in nodes if n.op_type != "Cast" or n.output[0] in read]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    produced = {name for node in nodes for name in node.output}
    infos = [v for v in model.graph.value_info if v.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)


def _sort_topologically(graph) -> None:
    """The converter appends its Casts after their consumers; ONNX (and TensorRT's parser)
    want producers first. Stable: nodes keep their order wherever their inputs allow."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {waiting[0].name}")
        pending = waiting
    nodes = [type(n)() for n in ordered]
    for copy, node in zip(nodes, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)


def convert_fp16(onnx_path: Path, out_path: Path, feeds: Iterable[dict] | None = None,
                 keep_ops: Sequence[str] = FP16_KEEP_OPS, keep_nodes: Collection[str] = (),
                 keep_residual_adds: bool = True, data_max: float = FP16_DATA_MAX
                 ) -> Fp16Conversion:
    """Mixed FP16 ONNX: FP32 I/O, FP16 elsewhere except the overflow-prone nodes."""
    import onnx

    model = onnx.load(str(onnx_path))
    reasons: dict[str, str] = {name: "requested" for name in keep_nodes}
    for name, why in fp32_reasons(model, keep_ops, keep_residual_adds).items():
        reasons.setdefault(name, why)
    if feeds is not None:
        for name, peak in large_value_nodes(model, feeds, data_max).items():
            reasons.setdefault(name, f"|output| {peak:.0f} > {data_max:.0f} on calibration data")
    converted = mixed_fp16(model, reasons, keep_ops)
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
