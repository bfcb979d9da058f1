"""Per-layer error of a reduced-precision graph against its FP32 twin, for the report."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from samedge.quantize.fp16 import OUTPUT_BUDGET, output_chunks, probe_session
from samedge.quantize.openvino_nncf import read_openvino


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
    for part in output_chunks(base, [n for _, n in nodes], budget):
        outputs = [n.output[0] for n in part]
        a, b = probe_session(base, outputs), probe_session(other, outputs)
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
