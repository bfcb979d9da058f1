"""``samedge doctor BUNDLE [--target tensorrt-X.Y]``: what a TensorRT version's ONNX parser can
take of a bundle's graphs, and what this machine can run. Needs no TensorRT.

Per ONNX graph it prints the opset and every operator, data type or documented restriction the
target's parser does not support, read from onnx-tensorrt's operator matrix for that release
(``docs/operators.md``, stored in ``onnx_tensorrt_operators.json`` with the commit it came from);
then the backends installed here with their versions, the GPU's compute capability (CUDA driver
query) or the CPU's instruction set, and whether each engine in the bundle loads here and on the
target. The matrix is documentation, not a parse: a graph the matrix admits can still fail on a
restriction it does not state, and only ``samedge build --backend tensorrt`` on the device says.
"""

from __future__ import annotations

import json
import platform
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

from samedge.errors import SamedgeError
from samedge.runtime.backends.trt_compat import (
    SUPPORTED,
    check_engine_compatibility,
    gpu_compute_capability,
    is_jetson,
    parse_version,
    support_problem,
    version_problem,
)
from samedge.runtime.bundle import Bundle
from samedge.runtime.cpu import cpu_name, isa_summary

# ONNX TensorProto element types in the matrix's vocabulary ("TensorRT supports the following
# ONNX data types: ...").
ONNX_TYPES = {1: "FLOAT32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32",
              7: "INT64", 8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32",
              13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16", 17: "FP8",
              18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4"}


def parse_target(text: str) -> str:
    """``tensorrt-10.3`` (or ``10.3``) → ``"10.3"``."""
    match = re.fullmatch(r"(?:tensorrt-?)?(\d+(?:\.\d+){0,3})", text.strip().lower())
    if not match:
        raise SamedgeError(f"unknown target {text!r}", hint="use tensorrt-X.Y, e.g. tensorrt-10.3")
    return match.group(1)


def operator_matrix(version: str) -> dict | None:
    """onnx-tensorrt's matrix documenting ``version``'s parser: the newest one at or below it
    (None below the oldest stored, 8.5)."""
    data = json.loads(resources.files("samedge").joinpath("onnx_tensorrt_operators.json")
                      .read_text())
    v = parse_version(version)
    chosen = None
    for matrix in data["matrices"]:
        if parse_version(matrix["from"]) <= v and (
                matrix["until"] is None or v < parse_version(matrix["until"])):
            chosen = matrix
    return chosen


def _limited(matrix: dict) -> set[str]:
    """Types the matrix's notes give limited support (cast down by the parser)."""
    out: set[str] = set()
    for note in matrix["notes"]:
        found = re.search(r"limited support for ([A-Z0-9, ]+?(?:and [A-Z0-9]+)?) types?", note)
        if found:
            out.update(t.strip() for t in re.split(r",|\band\b", found.group(1)) if t.strip())
    return out


@dataclass
class GraphCheck:
    """One ONNX graph against one TensorRT version's documented parser."""

    label: str
    opset: int
    operators: Counter
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def graph_types(model) -> set[str]:
    """Element types of every tensor in the graph (after ONNX's type inference)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    codes = {t.data_type for t in graph.initializer}
    codes |= {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output,
                                                      *graph.value_info)}
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to":
                codes.add(attribute.i)
            if attribute.name == "value" and attribute.t.data_type:
                codes.add(attribute.t.data_type)
    return {ONNX_TYPES.get(code, f"type {code}") for code in codes if code}


def low_precision_ops(model) -> dict[str, Counter]:
    """Per reduced float type (FLOAT16, BFLOAT16), how many nodes of each op produce it: the
    parser's matrix lists per op which types it imports."""
    import onnx

    from samedge.export.tensorrt import tensor_types

    types = tensor_types(model)
    found: dict[str, Counter] = {}
    for code in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        ops = Counter(node.op_type for node in model.graph.node
                      if any(types.get(out) == code for out in node.output))
        if ops:
            found[ONNX_TYPES[code]] = ops
    return found


def _nonzero_zero_points(model) -> list[str]:
    """Q/DQ nodes whose zero point is not 0 (every matrix: "zero point must be zero")."""
    from onnx import numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    bad = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            tensor = constants.get(node.input[2])
            if tensor is not None and numpy_helper.to_array(tensor).any():
                bad.append(node.name)
    return bad


def check_graph(path: Path, label: str, matrix: dict) -> GraphCheck:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    operators = Counter(node.op_type for node in model.graph.node)
    check = GraphCheck(label, opset, operators)
    low, high = matrix["opset"]
    if not low <= opset <= high:
        check.problems.append(f"opset {opset} outside the parser's {low}–{high}")
    for op, count in sorted(operators.items()):
        entry = matrix["operators"].get(op)
        if entry is None:
            check.problems.append(f"{op} (×{count}) is not in the operator matrix")
        elif not entry["supported"]:
            check.problems.append(f"{op} (×{count}) is not supported")
    limited = _limited(matrix)
    for name in sorted(graph_types(model)):
        if name in matrix["data_types"]:
            continue
        if name in limited:
            check.notes.append(f"{name} tensors: limited support (the parser casts them down, "
                               "clamping values)")
        else:
            check.problems.append(f"data type {name} is not supported")
    for name, ops in low_precision_ops(model).items():
        if name not in matrix["data_types"]:
            continue  # already a problem as a data type
        short = {"FLOAT16": "FP16", "BFLOAT16": "BF16"}[name]
        unlisted = {op: n for op, n in sorted(ops.items())
                    if short not in (matrix["operators"].get(op) or {}).get("types", [short])}
        if unlisted:
            check.problems.append(f"{short} nodes of ops the parser does not list for {short}: "
                                  + ", ".join(f"{op} ×{n}" for op, n in unlisted.items()))
    zero_points = _nonzero_zero_points(model)
    if zero_points:
        check.problems.append(f"{len(zero_points)} Q/DQ nodes with a nonzero zero point (must be "
                              f"0), e.g. {zero_points[0]}")
    return check


def tensorrt_version() -> str | None:
    """The importable TensorRT's version (None when it is absent or does not load)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def installed_backends() -> dict[str, str]:
    """Backends importable here, with versions (and ONNX Runtime's execution providers)."""
    out: dict[str, str] = {}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = (f"{ort.__version__} (providers: "
                              f"{', '.join(ort.get_available_providers())}; samedge uses CPU)")
    except ImportError:
        pass
    for dist in ("openvino", "polygraphy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    version = tensorrt_version()
    if version:
        problem = support_problem(version)
        out["tensorrt"] = version + (f" — not supported: {problem}" if problem else "")
    return out


def machine() -> dict[str, str]:
    """GPU (compute capability from the CUDA driver, Jetson or not) or CPU and its ISA."""
    out = {"platform": f"{platform.system()} {platform.machine()}, Python "
                       f"{platform.python_version()}"}
    capability = gpu_compute_capability()
    out["gpu"] = (f"compute capability {capability}" + (" (Jetson)" if is_jetson() else "")
                  if capability else "none visible (no CUDA driver answered)")
    out["cpu"] = f"{cpu_name()}; ISA: {isa_summary()}"
    return out


@dataclass
class DoctorReport:
    bundle: Path
    target: str | None
    target_note: str
    checks: list[GraphCheck]
    backends: dict[str, str]
    machine: dict[str, str]
    engines: list[tuple[str, str, str | None]]  # (engine, here, on the target)
    blocked: bool

    @property
    def exit_code(self) -> int:
        return 1 if self.blocked else 0

    def lines(self) -> list[str]:
        out = [f"samedge doctor {self.bundle}", f"target: {self.target_note}"]
        for check in self.checks:
            ops = ", ".join(f"{op} ×{n}" for op, n in sorted(check.operators.items()))
            verdict = "parses (per the matrix)" if not check.problems else "WILL NOT PARSE"
            out.append(f"  {check.label}: opset {check.opset}; {verdict}")
            out += [f"    - {p}" for p in check.problems]
            out += [f"    · {n}" for n in check.notes]
            out.append(f"    operators: {ops}")
        out.append("installed backends: " + ("; ".join(f"{k} {v}" for k, v in
                                                        self.backends.items()) or "none"))
        out += [f"{key}: {value}" for key, value in self.machine.items()]
        if not self.engines:
            out.append("engines: none in the bundle")
        for label, here, target in self.engines:
            out.append(f"engine {label}: here — {here}"
                       + (f"; on TensorRT {self.target} — {target}" if target else ""))
        return out


def doctor(bundle_path: str | Path, target: str | None = None) -> DoctorReport:
    bundle = Bundle(bundle_path)
    backends = installed_backends()
    here = tensorrt_version()
    version = parse_target(target) if target else here
    checks: list[GraphCheck] = []
    blocked = False
    if version is None:
        note = "none (no --target and no TensorRT here): graphs not checked"
    else:
        matrix = operator_matrix(version)
        problem = support_problem(version)
        note = f"TensorRT {version}" + ("" if target else " (installed here)")
        if matrix is None:
            note += "; no onnx-tensorrt operator matrix for it (the oldest stored is 8.5)"
        else:
            note += (f"; parser per onnx-tensorrt docs/operators.md @ {matrix['ref']} "
                     f"({matrix['commit'][:10]}: \"{matrix['header']}\"), the newest matrix "
                     "stored at or below this version")
        if problem:
            note += f"; below samedge's supported range ({SUPPORTED}): {problem}"
            blocked = True
        if matrix is not None:
            for artifact in bundle.artifacts:
                if artifact["format"] == "onnx":
                    check = check_graph(bundle.entry_path(artifact),
                                        f"{artifact['graph']} {artifact['precision']} "
                                        f"({artifact['entry']})", matrix)
                    checks.append(check)
                    blocked |= bool(check.problems)
    capability = gpu_compute_capability()
    engines = []
    for artifact in bundle.artifacts:
        if artifact["format"] != "tensorrt_engine":
            continue
        record = artifact.get("engine")
        label = f"{artifact['graph']} {artifact['precision']} (built with TensorRT " \
                f"{(record or {}).get('tensorrt_version', '?')}, compute capability " \
                f"{(record or {}).get('compute_capability', '?')})"
        if here is None:
            verdict = "no TensorRT installed here"
        else:
            try:
                check_engine_compatibility(record, here, capability)
                verdict = "loads"
            except SamedgeError as exc:
                verdict = f"will not load: {str(exc).splitlines()[0]}"
                blocked = True
        on_target = None
        if target and record:
            problem = version_problem(record.get("tensorrt_version", "0"), version,
                                      bool(record.get("version_compatible")))
            on_target = f"will not load: {problem}" if problem else "version matches (GPU " \
                                                                   "checked on the device)"
        engines.append((label, verdict, on_target))
    return DoctorReport(Path(bundle_path), version, note, checks, backends, machine(), engines,
                        blocked)
