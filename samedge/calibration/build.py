"""Adding INT8 / FP16 variants to an existing bundle: quantize, measure, gate, commit atomically.

:func:`build_variants` is ``samedge build BUNDLE --backend B --precision P``: it reads the bundle's
FP32 graphs, quantizes or converts them (``quantize``), runs the accuracy-controlled search where
asked, measures every candidate through the real runtime ``Predictor`` against the FP32 PyTorch
model (``drift``), gates it (``gate``), and commits only passing artifacts, each with its drift
results, gate verdict, calibration facts and the ops kept in float next to its files in the
manifest. Staging, measuring and committing go through :class:`BundleWriter`, so an interrupted
build leaves the previous bundle untouched. :func:`calibrate_bundle` records which data to
calibrate on; :func:`validate_bundle` re-measures every variant on held-out data and writes the
report; :func:`quantize_for_pipeline` is the step ``samedge pipeline`` runs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from samedge.calibration.calibset import CalibrationSet, Feeds, PromptPolicy, load_slices
from samedge.calibration.drift import Item, SemanticDrift, VariantDrift
from samedge.calibration.gate import SEARCH_TARGET, Gate, GateResult, GateSet
from samedge.calibration.quantize import (
    NncfConfig,
    OnnxMixed,
    OpenVinoMixed,
    SearchResult,
    accuracy_search,
    calibrate_onnx,
    convert_fp16,
    nncf_quantize,
    qdq_report,
    quantize_qdq,
    rank_units,
    read_openvino,
    save_openvino,
)
from samedge.calibration.references import Measured, centre, references_for
from samedge.calibration.sources import Slice, bundled_slices, bundled_stacks, read_stacks
from samedge.calibration.windows import Window, parse_window
from samedge.errors import BackendUnavailableError, DataSourceError, SamedgeError
from samedge.export.bundle import BundleWriter, write_manifest
from samedge.export.openvino import opt_out_of_telemetry
from samedge.progress import Steps
from samedge.runtime.backends import open_backend
from samedge.runtime.bundle import MANIFEST_NAME, Bundle
from samedge.runtime.predictor import Predictor

PRECISIONS = ("int8", "fp16")
GRAPHS = ("encoder", "decoder")
# Backend → (artifact format written, backend that executes it for validation here).
TARGETS = {
    "openvino": {"int8": "openvino_ir", "fp16": "openvino_ir"},
    "onnxruntime": {"int8": "onnx", "fp16": "onnx"},
    # TensorRT builds its engines from these ONNX graphs on the target; here they are validated
    # on ONNX Runtime (no TensorRT builder can be installed on this machine).
    "tensorrt": {"int8": "onnx", "fp16": "onnx"},
}
MANIFEST_KEEP = ("model", "preprocessing", "graphs", "validation_inputs", "calibration",
                 "default_variant")


def run_backend(fmt: str) -> str:
    return "openvino" if fmt == "openvino_ir" else "onnxruntime"


# -------------------------------------------------------------------------------------------------
# Options and results
# -------------------------------------------------------------------------------------------------
@dataclass
class SearchOptions:
    """Accuracy control: ``method`` "search" (samedge's: rank ops by single-op INT8 error, bisect
    on the real metric), "nncf" (``nncf.quantize_with_accuracy_control``, OpenVINO only) or
    "none" (plain PTQ). ``target`` is what the search aims for (default: mean Dice ≥ 0.99 and
    worst ≥ 0.95, stricter than the admission gate); ``tune_on`` which slices it measures:
    ``calibration`` (``tune_count`` slices of the calibration set, keeping validation held out)
    or ``validation``. ``granularity`` (OpenVINO): ``op`` switches each quantized op (with the ops
    sharing its input quantizer), ``block`` whole blocks — coarser, about 4× fewer units to rank,
    for a time budget (``samedge pipeline``)."""

    method: str = "search"
    target: Gate = SEARCH_TARGET
    tune_on: str = "calibration"
    tune_count: int = 8
    ranking_count: int = 2
    max_evaluations: int = 10
    granularity: str = "op"


@dataclass
class Candidate:
    graph: str
    fmt: str
    precision: str
    files: list[Path]
    meta: dict = field(default_factory=dict)
    search: SearchResult | None = None
    drift: VariantDrift | None = None
    gate: GateResult | None = None
    error: str | None = None
    # passed its gate alone, kept out because the pair with the other graph's variant fails
    held_back: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.graph, self.fmt, self.precision

    @property
    def kept(self) -> bool:
        return self.gate is not None and self.gate.passed and not self.held_back

    def why_out(self) -> str:
        """Why a candidate stays out of the bundle: a tool error, the pair, or its gate."""
        if self.error or self.held_back:
            return self.error or self.held_back
        return "; ".join(self.gate.reasons) if self.gate else "not measured"

    def label(self) -> str:
        return f"{self.graph} {self.fmt} {self.precision}"


@dataclass
class BuildResult:
    bundle: Path
    manifest: dict
    added: list[Candidate]
    rejected: list[Candidate]
    combined: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    report: Path | None = None

    @property
    def passed(self) -> bool:
        return not self.rejected

    def lines(self) -> list[str]:
        out = []
        for c in self.added:
            s = c.drift.summary() if c.drift else {}
            out.append(f"added {c.label()}: mean Dice {s.get('dice_mean', 0):.4f}, worst "
                       f"{s.get('dice_min', 0):.4f} — {c.gate.describe() if c.gate else ''}")
        for c in self.rejected:
            out.append(f"kept out {c.label()}: {c.why_out()}")
        return out


# -------------------------------------------------------------------------------------------------
# Measuring candidates through the real Predictor
# -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_tools(quiet: bool):
    """``--quiet`` reaches the tools too: NNCF's progress bars and NNCF/ONNX Runtime log lines
    are swallowed while a candidate is built (nothing changes without ``quiet``)."""
    if not quiet:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


class _Memo:
    """A backend that remembers its outputs per input (the FP32 encoder while decoders vary)."""

    def __init__(self, inner):
        self.inner, self.name, self._cache = inner, inner.name, {}
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import hashlib

        key = hashlib.sha1(b"".join(np.ascontiguousarray(inputs[n]).tobytes()
                                    for n in self.input_names)).hexdigest()
        if key not in self._cache:
            self._cache[key] = self.inner.run(inputs)
        return {k: v.copy() for k, v in self._cache[key].items()}


class CandidateProbe:
    """Measures an encoder or decoder graph that is not yet in a bundle: the bundle's FP32
    Predictor with one graph swapped for the candidate, so preprocessing, prompt handling, the
    other graph and mask upscaling are the runtime's own."""

    def __init__(self, bundle: Bundle, graph: str, backend: str, measured: Measured,
                 threads: int | None):
        self.bundle, self.graph, self.backend = bundle, graph, backend
        self.measured, self.threads = measured, threads
        self.predictor = Predictor(bundle, backend=backend, precision="fp32", threads=threads)
        if graph == "decoder":  # the FP32 encoder's output does not change between candidates
            self.predictor.encoder = _Memo(self.predictor.encoder)
        self._tmp = Path(tempfile.mkdtemp(prefix="samedge-candidate-"))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def open(self, model: Any):
        """A runtime backend for an ``ov.Model`` or ``onnx.ModelProto`` (written to a temp file,
        then opened exactly as the bundle's files are)."""
        import onnx

        if isinstance(model, onnx.ModelProto):
            path = self._tmp / "candidate.onnx"
            onnx.save(model, str(path))
            return open_backend("onnxruntime", path, self.threads)
        path = self._tmp / "candidate.xml"
        save_openvino(model, path)
        return open_backend("openvino", path, self.threads)

    def drift(self, model: Any, label: str = "candidate",
              indices: Sequence[int] | None = None) -> VariantDrift | SemanticDrift:
        """Drift of a candidate (model, or an opened backend) on the probe's items."""
        backend = model if hasattr(model, "run") else self.open(model)
        original = getattr(self.predictor, self.graph)
        setattr(self.predictor, self.graph, backend)
        measured = self.measured if indices is None else self.measured.subset(indices)
        try:
            return measured.measure(self.bundle, backend.name, predictor=self.predictor,
                                    label=label)
        finally:
            setattr(self.predictor, self.graph, original)

    def summary(self, model: Any) -> dict:
        return self.drift(model).summary()


class CompiledBackend:
    """Runtime-backend view of an ``ov.CompiledModel`` (what NNCF's validation_fn receives);
    runs exactly as :class:`samedge.runtime.backends.openvino.OpenVinoBackend` does."""

    name = "openvino"

    def __init__(self, compiled):
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.input_names = tuple(p.get_any_name() for p in compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in compiled.outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._request.infer({n: inputs[n] for n in self.input_names},
                                      share_inputs=False)
        return {name: np.array(results[port], copy=True)
                for name, port in zip(self.output_names, self._compiled.outputs)}


def quick_runner(model: Any, threads: int | None) -> Callable[[dict], dict]:
    """Run a candidate in memory (no file round trip) for the ranking proxy only; decisions use
    the real backends through :class:`CandidateProbe`."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        inputs = [i.name for i in session.get_inputs()]
        return lambda feed: dict(zip(names, session.run(None, {n: feed[n] for n in inputs})))
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    ports = [(p.get_any_name(), p) for p in compiled.outputs]
    inputs = [p.get_any_name() for p in compiled.inputs]

    def run(feed: dict) -> dict:
        result = request.infer({n: feed[n] for n in inputs})
        return {name: np.asarray(result[port]) for name, port in ports}

    return run


def _rel_sq(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sum((got - want) ** 2) / max(np.sum(want.astype(np.float64) ** 2), 1e-12))


def encoder_proxy(probe: CandidateProbe, measured: Measured, count: int) -> Callable[[Any], float]:
    """Mean squared relative embedding error vs FP32 PyTorch on ``count`` items."""
    pairs = measured.encoder_pairs(probe.bundle.preprocessing, count)

    def proxy(model: Any) -> float:
        run = quick_runner(model, probe.threads)
        return float(np.mean([_rel_sq(run({"image": x})["image_embeddings"][part], want)
                              for x, want, part in pairs]))

    return proxy


def decoder_proxy(probe: CandidateProbe, feeds: list[dict], reference) -> Callable[[Any], float]:
    """Mean squared relative error of the decoder's logits (low-res masks, or a semantic
    decoder's class logits: its first output) vs the FP32 decoder."""
    name = reference.output_names[0]
    wants = [reference.run(f)[name] for f in feeds]

    def proxy(model: Any) -> float:
        run = quick_runner(model, probe.threads)
        return float(np.mean([_rel_sq(run(f)[name], want) for f, want in zip(feeds, wants)]))

    return proxy


# -------------------------------------------------------------------------------------------------
# Building one candidate
# -------------------------------------------------------------------------------------------------
def rebuild_options(model: dict) -> dict:
    """Builder arguments that rebuild the bundle's FP32 model from its manifest record: the
    checkpoint and frozen base it names, and the hyper-parameters no file stores (input size,
    depth, MA-SAM's FacT scale, Med-SA's era)."""
    import inspect

    from samedge.models.registry import FAMILIES

    record = model.get("checkpoint") or {}
    wanted = {"checkpoint": record.get("path"), "base": record.get("base"),
              "variant": model.get("variant"), "image_size": model.get("image_size"),
              "depth": model.get("depth"), "scale": record.get("scale"),
              "era": record.get("era"), "rank": record.get("rank")}
    accepted = inspect.signature(FAMILIES[model["family"]]).parameters
    options = {k: v for k, v in wanted.items() if k in accepted and v is not None}
    if model["family"] == "litemedsam" and "checkpoint" in options:
        from samedge.models.litemedsam import default_checkpoint
        from samedge.runtime.bundle import sha256_file

        shipped = default_checkpoint()
        if not Path(options["checkpoint"]).is_file() and record.get("sha256") == \
                sha256_file(shipped):  # exported on another machine from the shipped weights
            options["checkpoint"] = str(shipped)
    return options


def _card_for(bundle: Bundle, card=None):
    if card is not None:
        return card
    from samedge.models import build_model

    model = bundle.model
    options = rebuild_options(model)
    if model["family"] == "sam" and "config" in (model.get("checkpoint") or {}) or \
            model["family"] != "litemedsam" and "checkpoint" not in options:
        raise SamedgeError("cannot rebuild the FP32 reference model for this bundle: it was "
                           "exported from random or custom-configured weights",
                           hint="pass the model in Python (card=...)")
    missing = [str(v) for k, v in options.items() if k in ("checkpoint", "base")
               and not Path(v).is_file()]
    if missing:
        raise SamedgeError(f"the FP32 reference model is rebuilt from {', '.join(missing)}, which "
                           "is no longer there", hint="put the checkpoint back where the "
                                                      "bundle was exported from")
    from samedge.runtime.bundle import sha256_file

    record = model.get("checkpoint") or {}
    for key, digest in (("checkpoint", "sha256"), ("base", "base_sha256")):
        if key in options and record.get(digest) and sha256_file(Path(options[key])) != \
                record[digest]:
            raise SamedgeError(f"{options[key]} changed since the bundle was exported (sha256 "
                               "differs): drift against it would not describe this bundle",
                               hint="restore the exported checkpoint, or export a new bundle")
    try:
        return build_model(model["family"], **options)
    except SamedgeError as exc:
        raise SamedgeError(f"cannot rebuild the FP32 reference model for this bundle: {exc}",
                           hint="pass the model (card=...) or its checkpoint") from exc


def _feeds_for(graph: str, calibration: CalibrationSet, bundle: Bundle, encoder_backend,
               policy: PromptPolicy) -> Feeds:
    pre, depth = bundle.preprocessing, int(bundle.model.get("depth", 1))
    if graph == "encoder":
        return calibration.encoder_inputs(pre, depth)

    def encode(tensor: np.ndarray) -> np.ndarray:
        return encoder_backend.run({"image": tensor})["image_embeddings"]

    if bundle.model.get("decoder") == "semantic":
        return calibration.semantic_decoder_inputs(pre, encode, depth)
    return calibration.decoder_inputs(pre, encode, policy, depth=depth)


def default_validation(bundle: Bundle) -> list[Item]:
    """The bundled real slices, or for depth models three stacks of the bundled MR volume."""
    depth = int(bundle.model.get("depth", 1))
    return bundled_stacks(depth, count=3) if depth > 1 else bundled_slices()


def _search(units, realize, probe: CandidateProbe, proxy, options: SearchOptions,
            steps: Steps, label: str):
    """Rank + bisect; returns (model, SearchResult)."""
    t0 = time.perf_counter()
    with steps.step(f"{label}: rank {len(units)} quantized units by their INT8 error alone"):
        sensitivity = rank_units(list(units), realize, proxy, steps)
    ranking = time.perf_counter() - t0
    target = options.target
    with steps.step(f"{label}: accuracy-controlled search (target: {target.min_mean_dice:.3f} "
                    f"mean, {target.min_worst_dice:.2f} worst)"):
        model, result = accuracy_search(list(units), realize, probe.summary,
                                        lambda s: target.evaluate(s).passed, sensitivity,
                                        steps, options.max_evaluations)
    result.ranking_seconds = ranking
    return model, result


def _nncf_accuracy_control(float_model, feeds: Feeds, config: NncfConfig, probe: CandidateProbe,
                           options: "SearchOptions", steps: Steps):
    """``nncf.quantize_with_accuracy_control``: its ``validation_fn`` runs the real metric (the
    compiled candidate swapped into the runtime Predictor, masks vs FP32 PyTorch) and returns the
    gate's combined Dice score, plus per-slice mean Dice for NNCF's ranking."""
    opt_out_of_telemetry()
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    names = [p.get_any_name() for p in float_model.inputs]
    target = options.target

    def validation_fn(compiled_model, data) -> tuple[float, list[float]]:
        """NNCF ranks on the per-item values, index for index with ``data``: one mean Dice per
        validation item (slice or stack), each item measured on its own."""
        backend = CompiledBackend(compiled_model)
        dices, per_item = [], []
        for index in (int(i) for i in data):
            values = [d for _, _, d in probe.drift(backend, indices=[index]).cases]
            dices += values
            per_item.append(float(np.mean(values)))
        return target.score(float(np.mean(dices)), float(np.min(dices))), per_item

    arguments = config.arguments()
    restorer = AdvancedAccuracyRestorerParameters(ranking_subset_size=options.ranking_count,
                                                  max_num_iterations=options.max_evaluations * 8)
    with steps.step("NNCF quantize_with_accuracy_control"):
        return nncf.quantize_with_accuracy_control(
            float_model, nncf.Dataset(feeds, lambda item: {n: item[n] for n in names}),
            nncf.Dataset(list(range(len(probe.measured.items)))), validation_fn,
            max_drop=1.0 - target.min_mean_dice, drop_type=nncf.DropType.ABSOLUTE,
            preset=arguments["preset"], model_type=arguments["model_type"],
            subset_size=arguments["subset_size"],
            fast_bias_correction=arguments["fast_bias_correction"],
            ignored_scope=arguments["ignored_scope"],
            advanced_quantization_parameters=arguments["advanced_parameters"],
            advanced_accuracy_restorer_parameters=restorer)


def _openvino_int8(graph: str, bundle: Bundle, stage: Path, feeds: Feeds, probe: CandidateProbe,
                   proxy, options: SearchOptions, config: NncfConfig, steps: Steps) -> Candidate:
    source = bundle.entry_path(bundle.find(graph, "openvino", "fp32"))
    float_model = read_openvino(source)
    start = time.perf_counter()
    with steps.step(f"{graph}: NNCF INT8 calibration on {len(feeds)} inputs"):
        quantized = nncf_quantize(float_model, feeds, config)
    calibration_s = time.perf_counter() - start
    mixed = OpenVinoMixed(float_model, quantized, options.granularity)
    search = None
    model = quantized
    if options.method == "search":
        model, search = _search(list(mixed.units), mixed.realize, probe, proxy, options, steps,
                                graph)
    elif options.method == "nncf":
        model = _nncf_accuracy_control(float_model, feeds, config, probe, options, steps)
    xml = stage / "openvino" / f"{graph}_int8.xml"
    files = save_openvino(model, xml)
    meta = {"quantization": {**config.describe(), "calibration_seconds": round(calibration_s, 1),
                             "calibration_inputs": len(feeds),
                             "accuracy_control": options.method}}
    if search is not None:
        meta["quantization"]["search"] = search.describe()
    return Candidate(graph, "openvino_ir", "int8", files, meta, search)


def _qdq_int8(graph: str, bundle: Bundle, stage: Path, feeds: Feeds, probe: CandidateProbe,
              proxy, options: SearchOptions, method: str, steps: Steps) -> Candidate:
    source = bundle.entry_path(bundle.find(graph, "onnxruntime", "fp32"))
    with tempfile.TemporaryDirectory(prefix="samedge-qdq-") as tmp:
        tmp = Path(tmp)
        with steps.step(f"{graph}: ONNX Runtime calibration ({method}) on {len(feeds)} inputs"):
            calibration = calibrate_onnx(source, feeds, tmp / "ranges.json", method)
        full = quantize_qdq(source, tmp / "all.onnx", calibration)
        mixed = OnnxMixed(source, full)
        excluded: list[str] = []
        search = None
        if options.method != "none":
            _, search = _search(mixed.units, mixed.realize, probe, proxy, options, steps, graph)
            excluded = search.float_units
        out = stage / f"{graph}_int8_qdq.onnx"
        quantize_qdq(source, out, calibration, exclude=excluded)
        facts = qdq_report(out)
    meta = {"quantization": {
        "tool": "onnxruntime.quantization.quantize_static (QDQ)",
        "scheme": "int8 symmetric activations and weights (zero point 0), per-channel weights",
        "calibration_method": method, "calibration_seconds": round(calibration.seconds, 1),
        "calibration_inputs": calibration.slices, "accuracy_control": options.method,
        "float_nodes": excluded, "qdq": {k: v for k, v in facts.items()
                                         if k != "quantized_nodes"},
        "quantized_nodes": len(facts["quantized_nodes"]),
    }}
    if search is not None:
        meta["quantization"]["search"] = search.describe()
    return Candidate(graph, "onnx", "int8", [out], meta, search)


def _fp16(graph: str, bundle: Bundle, stage: Path, fmt: str, feeds: Feeds, steps: Steps
          ) -> Candidate:
    if fmt == "openvino_ir":
        from samedge.export.openvino import convert_to_ir

        source = bundle.entry_path(bundle.find(graph, "onnxruntime", "fp32"))
        (stage / "openvino").mkdir(exist_ok=True)
        files = convert_to_ir(source, stage / "openvino" / f"{graph}_fp16.xml", True)
        return Candidate(graph, fmt, "fp16", files,
                         {"conversion": {"tool": "openvino.save_model(compress_to_fp16=True)"}})
    source = bundle.entry_path(bundle.find(graph, "onnxruntime", "fp32"))
    with steps.step(f"{graph}: mixed FP16 ONNX (LayerNorm/softmax/residual adds in FP32)"):
        conversion = convert_fp16(source, stage / f"{graph}_fp16.onnx", feeds.take(2))
    meta = {"conversion": {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True, "fp32_nodes": len(conversion.kept_fp32),
        "fp32_reasons": _count_reasons(conversion.reasons)}}
    return Candidate(graph, "onnx", "fp16", [conversion.path], meta)


def _count_reasons(reasons: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons.values():
        key = reason.split(" on calibration")[0] if "|output|" not in reason else \
            "output magnitude above FP16-safe range on calibration data"
        counts[key] = counts.get(key, 0) + 1
    return counts


# -------------------------------------------------------------------------------------------------
# The build
# -------------------------------------------------------------------------------------------------
def calibration_from_manifest(manifest: dict) -> CalibrationSet:
    """The calibration set recorded by ``calibrate_bundle`` (bundled real slices if none)."""
    spec = manifest.get("calibration") or {}
    if not spec or spec.get("bundled", False):
        return CalibrationSet(None, count=int(spec.get("slices", 64)), seed=int(spec.get("seed", 0)))
    return CalibrationSet(spec["sources"], count=int(spec["slices"]), seed=int(spec.get("seed", 0)),
                          window=spec.get("window"), augment=bool(spec.get("augment", True)),
                          modality=spec.get("modality"))


def build_variants(
    bundle_path: str | Path,
    precision: str = "int8",
    backend: str = "openvino",
    graphs: Sequence[str] = GRAPHS,
    calibration: CalibrationSet | None = None,
    validation: Sequence[Slice] | None = None,
    prompts: PromptPolicy | None = None,
    gates: GateSet | None = None,
    search: SearchOptions | None = None,
    nncf_config: NncfConfig | None = None,
    ort_calibration: str = "minmax",
    card=None,
    threads: int | None = None,
    steps: Steps | None = None,
    report: bool = True,
    layer_errors: bool = True,
) -> BuildResult:
    """Add ``precision`` variants for ``backend`` to the bundle; only gate-passing ones stay.

    ``validation``: slices (stacks of D adjacent slices for depth models) the gate is measured
    on (default: the bundled real slices or stacks, with ``prompts`` — auto boxes, plus centre
    clicks for point-trained families; semantic families need no prompt).
    """
    steps = steps or Steps(quiet=True)
    started = time.perf_counter()
    if precision not in PRECISIONS:
        raise SamedgeError(f"precision {precision!r} is not built here", hint=f"use {PRECISIONS}")
    if backend not in TARGETS:
        raise SamedgeError(f"unknown backend {backend!r}", hint=f"use one of {sorted(TARGETS)}")
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown or not graphs:
        raise SamedgeError(f"unknown graph(s) {', '.join(unknown) or '(none)'}",
                           hint="use encoder, decoder or encoder,decoder")
    if search is not None and search.method == "nncf" and backend != "openvino":
        raise SamedgeError("accuracy control 'nncf' (quantize_with_accuracy_control) works on "
                           "OpenVINO models only", hint="use --search search for ONNX graphs")
    if backend == "tensorrt":
        require_tensorrt(precision)
    bundle_path = Path(bundle_path)
    bundle = Bundle(bundle_path)
    card = _card_for(bundle, card)
    gates = gates or GateSet()
    search = search or SearchOptions()
    search = replace(search, target=at_least(search.target, gates.for_precision(precision)))
    nncf_config = nncf_config or NncfConfig()
    calibration = calibration or calibration_from_manifest(bundle.manifest)
    policy = prompts or PromptPolicy(clicks=bundle.model.get("prompt") == "points")
    validation = list(validation) if validation is not None else default_validation(bundle)
    fmt = TARGETS[backend][precision]
    measure_backend = run_backend(fmt)
    timings: dict[str, float] = {}

    with steps.step(f"FP32 PyTorch reference on {len(validation)} validation slices"):
        measured = references_for(card, validation, policy, Steps(quiet=True))
    tuning = measured
    if precision == "int8" and search.method != "none" and search.tune_on == "calibration":
        depth = int(bundle.model.get("depth", 1))
        tune_slices = [s for _, s in zip(range(search.tune_count), calibration.iter_items(depth))]
        with steps.step(f"FP32 PyTorch reference on {len(tune_slices)} tuning slices"):
            tuning = references_for(card, tune_slices, policy, Steps(quiet=True))

    encoder_fp32 = open_backend(measure_backend, bundle.entry_path(
        bundle.find("encoder", measure_backend, "fp32")), threads)
    candidates: list[Candidate] = []
    with BundleWriter(bundle_path) as writer:
        stage = writer.staging
        replaced = {(g, fmt, precision) for g in graphs}
        writer.adopt(bundle_path, [a for a in bundle.artifacts
                                   if (a["graph"], a["format"], a["precision"]) not in replaced])
        for graph in graphs:
            t0 = time.perf_counter()
            feeds = _feeds_for(graph, calibration, bundle, encoder_fp32, policy)
            probe = CandidateProbe(bundle, graph, measure_backend, tuning, threads)
            tools = quiet_tools(steps.quiet)
            tools.__enter__()
            try:
                if precision == "fp16":
                    candidate = _fp16(graph, bundle, stage, fmt, feeds, steps)
                else:
                    if graph == "encoder":
                        proxy = encoder_proxy(probe, tuning, search.ranking_count)
                    else:
                        ranking = feeds.take(search.ranking_count)
                        fp32 = open_backend(measure_backend, bundle.entry_path(
                            bundle.find("decoder", measure_backend, "fp32")), threads)
                        proxy = decoder_proxy(probe, ranking, fp32)
                    if fmt == "openvino_ir":
                        candidate = _openvino_int8(graph, bundle, stage, feeds, probe, proxy,
                                                   search, nncf_config, steps)
                    else:
                        candidate = _qdq_int8(graph, bundle, stage, feeds, probe, proxy, search,
                                              ort_calibration, steps)
                candidate.meta["calibration_data"] = calibration.describe() \
                    if precision == "int8" else None
            except SamedgeError:
                raise
            except Exception as exc:  # a tool failed on this graph: keep it out, say why
                candidate = Candidate(graph, fmt, precision, [], error=f"{type(exc).__name__}: "
                                                                         f"{exc}")
            finally:
                tools.__exit__(None, None, None)
                probe.close()
            timings[f"{graph} {precision}"] = time.perf_counter() - t0
            candidates.append(candidate)
            if candidate.files:
                writer.add_artifact(graph, fmt, precision, candidate.files, **candidate.meta)

        # Measure every candidate in the staged bundle through the real Predictor.
        write_manifest(stage, _provisional(bundle.manifest, writer.artifacts))
        staged = Bundle(stage)
        gate = gates.for_precision(precision)
        worst_cases: list = []
        layers: dict[str, list[dict]] = {}
        for candidate in candidates:
            if not candidate.files:
                continue
            enc = precision if candidate.graph == "encoder" else "fp32"
            dec = precision if candidate.graph == "decoder" else "fp32"
            keeper = WorstKeeper(candidate.label(), measured)
            with steps.step(f"drift of {candidate.label()} on {len(validation)} slices"):
                candidate.drift = measured.measure(staged, measure_backend, enc, dec, threads,
                                                   observe=keeper)
            candidate.gate = gate.evaluate(candidate.drift.summary())
            worst_cases += keeper.cases()
            if layer_errors and precision == "int8":
                with steps.step(f"per-layer error of {candidate.label()}"):
                    layers[candidate.label()] = candidate_layer_errors(
                        staged, candidate, measure_backend, measured, threads)
        combined = {}
        passing = {c.graph for c in candidates if c.gate and c.gate.passed}
        if {"encoder", "decoder"} <= passing and len(graphs) == 2:
            with steps.step(f"drift of encoder+decoder {precision} together"):
                drift = measured.measure(staged, measure_backend, precision, threads=threads)
            combined = {"drift": drift, "gate": gate.evaluate(drift.summary())}
            if not combined["gate"].passed:  # keep the graph that drifts less, in INT8 alone
                pair = [c for c in candidates if c.graph in passing]
                worse = min(pair, key=lambda c: (c.gate.dice_mean, c.gate.dice_min))
                other = next(c for c in pair if c is not worse)
                worse.held_back = (
                    f"passes alone, but with the {precision} {other.graph} the pair drifts beyond "
                    f"the gate ({'; '.join(combined['gate'].reasons)}); the {other.graph}, which "
                    "drifts less, stays")

        added, rejected = [], []
        for candidate in candidates:
            if candidate.kept:
                added.append(candidate)
            else:
                rejected.append(candidate)
                for file in candidate.files:
                    Path(file).unlink(missing_ok=True)
                writer.artifacts = [a for a in writer.artifacts
                                    if (a["graph"], a["format"], a["precision"]) != candidate.key]
        names = measured.names
        for artifact in writer.artifacts:
            for candidate in added:
                if (artifact["graph"], artifact["format"], artifact["precision"]) == candidate.key:
                    entry = validation_entry(candidate.drift, candidate.gate, names,
                                             {"encoder": "fp32", "decoder": "fp32",
                                              candidate.graph: precision})
                    artifact.setdefault("validation", {})[measure_backend] = entry
                    if combined and combined["gate"].passed:
                        artifact["validation_combined"] = validation_entry(
                            combined["drift"], combined["gate"], names,
                            {"encoder": precision, "decoder": precision})
        fields = {k: copy.deepcopy(bundle.manifest[k]) for k in MANIFEST_KEEP
                  if k in bundle.manifest}
        fields.setdefault("builds", copy.deepcopy(bundle.manifest.get("builds", [])))
        fields["builds"].append({
            "backend": backend, "precision": precision, "graphs": list(graphs),
            "added": [c.label() for c in added],
            "rejected": [{"variant": c.label(), "why": c.why_out()} for c in rejected],
            "seconds": round(time.perf_counter() - started, 1),
        })
        manifest = writer.commit(fields)
    result = BuildResult(bundle_path, manifest, added, rejected, combined, timings)
    if backend == "tensorrt" and added:
        result.manifest = add_tensorrt_engines(bundle_path, added, precision, steps)
    if report:
        from samedge.calibration.report import write_report

        result.report = write_report(bundle_path / "report", manifest,
                                     extras=report_extras(result, measured),
                                     worst_cases=worst_cases, layer_errors=layers).folder
    return result


class WorstKeeper:
    """``observe`` callback of ``measure_variant``: keeps the k worst prompts' masks."""

    def __init__(self, label: str, measured: Measured, k: int = 4):
        self.label, self.k, self._items = label, k, []
        self._prompts = measured.prompts()

    def __call__(self, item, kind, index, got, want, value) -> None:
        self._items.append((value, item, kind, index, got > 0, want > 0))
        self._items.sort(key=lambda t: t[0])
        del self._items[self.k:]

    def cases(self) -> list:
        from samedge.calibration.report import WorstCase

        out = []
        for value, item, kind, index, got, want in self._items:
            prompt = self._prompts.get(item.name)
            box = prompt.boxes[index] if prompt is not None and kind == "box" else None
            out.append(WorstCase(self.label, item.name, f"{kind} {index}", float(value),
                                 item.image, want, got, box))
        return out


def candidate_layer_errors(bundle: Bundle, candidate: Candidate, backend: str,
                           measured: Measured, threads: int | None, slices: int = 1
                           ) -> list[dict]:
    """Per-layer error of a candidate vs its FP32 graph (same inputs, both on ``backend``)."""
    from dataclasses import asdict

    from samedge.calibration.quantize import onnx_layer_errors, openvino_layer_errors

    encoder = None
    if candidate.graph == "decoder":
        encoder = open_backend(backend, bundle.entry_path(bundle.find("encoder", backend, "fp32")),
                               threads)
    sample = CalibrationSet(slices=measured.items[:slices], augment=False)
    feeds = list(_feeds_for(candidate.graph, sample, bundle, encoder,
                            PromptPolicy(clicks=bundle.model.get("prompt") == "points")))
    fp32 = bundle.entry_path(bundle.find(candidate.graph, backend, "fp32"))
    if candidate.fmt == "openvino_ir":
        rows = openvino_layer_errors(fp32, candidate.files[0], feeds, threads=threads)
    else:
        rows = onnx_layer_errors(fp32, candidate.files[0], feeds)
    return [asdict(r) for r in rows]


def _provisional(manifest: dict, artifacts: list[dict]) -> dict:
    data = {k: v for k, v in manifest.items() if k != "artifacts"}
    data["artifacts"] = artifacts
    return data


def validation_entry(drift: VariantDrift | SemanticDrift, gate: GateResult | None,
                     slice_names: Sequence[str],
                     measured_with: dict) -> dict:
    """The manifest's record of one measurement: summary, per-prompt Dice, gate verdict."""
    entry = {
        **drift.summary(),
        "slices": list(slice_names),  # a semantic summary's slice count is their number
        "reference": "FP32 PyTorch, same preprocessing",
        "measured_with": measured_with,
        "per_prompt": [{"slice": s, "prompt": p, "dice": round(float(d), 6)}
                       for s, p, d in drift.cases],
        "embedding_cosine_per_slice": [round(float(c), 6) for c in drift.embedding_cosine],
    }
    if gate is not None:
        entry["gate"] = gate.to_dict()
    return entry


def report_extras(result: BuildResult, measured: Measured) -> dict:
    """Search records for the report (per-op INT8 error = where drift enters)."""
    extras: dict[str, Any] = {"search": {}, "rejected": {}}
    for c in result.added + result.rejected:
        if c.search is not None:
            extras["search"][c.label()] = c.search.describe(top=30)
    for c in result.rejected:
        extras["rejected"][c.label()] = c.why_out()
    return extras


def at_least(target: Gate, gate: Gate) -> Gate:
    """The search target, raised where the admission gate is stricter (a gate override given
    on the command line must not be looser than what the search aims for)."""
    return replace(target, max_mean_dice_drop=min(target.max_mean_dice_drop,
                                                  gate.max_mean_dice_drop),
                   min_worst_dice=max(target.min_worst_dice, gate.min_worst_dice))


def require_tensorrt(precision: str) -> None:
    """``build --backend tensorrt`` builds engines, which needs TensorRT on this machine."""
    from samedge.export.tensorrt import _tensorrt

    try:
        _tensorrt()
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(
            f"cannot build TensorRT {precision} engines here: {exc.args[0]}",
            hint="TensorRT engines are built on the target GPU/Jetson that runs them. On this "
                 f"machine `samedge build BUNDLE --backend onnxruntime --precision {precision}` "
                 "builds and validates the graph TensorRT consumes ("
                 + ("explicit Q/DQ INT8 ONNX" if precision == "int8" else
                    "mixed FP16 ONNX, LayerNorm/softmax in FP32")
                 + "); run `--backend tensorrt` on the target to turn it into an engine",
        ) from exc


def add_tensorrt_engines(bundle_path: Path, candidates: Sequence[Candidate], precision: str,
                         steps: Steps) -> dict:
    """Build one engine per gate-passing ONNX graph on this GPU and add it to the bundle next to
    the graph it was built from. Its drift is that graph's (measured on ONNX Runtime); written to
    TensorRT's documented API and not run in this repository (no TensorRT here)."""
    from samedge.export.tensorrt import build_engine

    bundle = Bundle(bundle_path)
    with BundleWriter(bundle_path) as writer:
        writer.adopt(bundle_path, bundle.artifacts)
        (writer.staging / "tensorrt").mkdir(exist_ok=True)
        for candidate in candidates:
            source = bundle.find(candidate.graph, "onnxruntime", precision)
            inputs = {i["name"]: tuple(i["shape"])
                      for i in bundle.manifest["graphs"][candidate.graph]["inputs"]}
            engine = writer.staging / "tensorrt" / f"{candidate.graph}_{precision}.engine"
            with steps.step(f"TensorRT {precision} engine for the {candidate.graph}"):
                files = build_engine(bundle.entry_path(source), engine, inputs, precision)
            writer.add_artifact(candidate.graph, "tensorrt_engine", precision, files,
                                built_from=source["entry"],
                                engine=json.loads(Path(files[1]).read_text()),
                                validation=source.get("validation", {}))
        fields = {k: copy.deepcopy(bundle.manifest[k]) for k in (*MANIFEST_KEEP, "builds")
                  if k in bundle.manifest}
        return writer.commit(fields)


# -------------------------------------------------------------------------------------------------
# calibrate / validate / pipeline entry points
# -------------------------------------------------------------------------------------------------
def normalize_window(window: Window | None) -> Window | None:
    """Accept ``ct-abdomen``-style names as well as ``abdomen`` and ``L,W``."""
    if isinstance(window, str) and window.lower().startswith("ct-"):
        window = window[3:]
    parse_window(window)
    return window


def calibrate_bundle(bundle_path: str | Path, data: Sequence[str | Path] | None,
                     window: Window | None = None, count: int = 300, seed: int = 0,
                     augment: bool = True, modality: str | None = None,
                     family: str = "litemedsam", steps: Steps | None = None,
                     backends: Sequence[str] = ("onnxruntime", "openvino"), **model_options
                     ) -> dict:
    """``samedge calibrate --data DIR --window ct-abdomen -o bundle/``.

    Opens and checks the calibration data (typed errors for empty/unreadable folders and broken
    series; headers only), exports the bundle first when ``bundle_path`` holds none, and records
    the calibration set in the manifest so that ``build`` calibrates on exactly these slices.
    """
    steps = steps or Steps(quiet=True)
    window = normalize_window(window)
    calibration = CalibrationSet(data, count=count, seed=seed, window=window, augment=augment,
                                 modality=modality)
    bundle_path = Path(bundle_path)
    if not (bundle_path / MANIFEST_NAME).is_file():
        from samedge.export.atomic import check_target
        from samedge.export.exporter import export_bundle
        from samedge.models import build_model

        check_target(bundle_path)  # a foreign folder is refused before the model is built
        with steps.step(f"build {family} model"):
            card = build_model(family, **model_options)
        sample = [s for _, s in zip(range(3), calibration.iter_slices())]
        export_bundle(card, bundle_path, [s.image for s in sample], backends=backends,
                      steps=steps, image_names=[s.name for s in sample])
    with steps.step(f"read {calibration.count} calibration slices (one at a time)"):
        stats = calibration_statistics(calibration, Bundle(bundle_path, verify=False))
    manifest = Bundle(bundle_path).manifest
    manifest["calibration"] = {**calibration.describe(), "bundled": data is None,
                               "modality": modality, "statistics": stats,
                               "preprocessing": "samedge.runtime.transforms.preprocess"}
    write_manifest(bundle_path, manifest)
    return manifest


def calibration_statistics(calibration: CalibrationSet, bundle: Bundle) -> dict:
    """Streamed summary of what the encoder will be calibrated on (counts, sizes, input range)."""
    from samedge.runtime.transforms import preprocess

    modalities: dict[str, int] = {}
    lo, hi, means, sources = np.inf, -np.inf, [], set()
    for item in calibration.iter_slices():
        modalities[item.modality] = modalities.get(item.modality, 0) + 1
        tensor, _ = preprocess(item.image, bundle.preprocessing)
        lo, hi = min(lo, float(tensor.min())), max(hi, float(tensor.max()))
        means.append(float(tensor.mean()))
        sources.add(str(item.source) if item.source else item.name)
    if not means:
        raise DataSourceError("calibration data yielded no slices")
    return {"slices": len(means), "sources": len(sources), "modalities": modalities,
            "input_min": lo, "input_max": hi, "input_mean": float(np.mean(means))}


@dataclass
class ValidationResult:
    passed: bool
    variants: dict[str, dict]
    report: Path | None

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def validate_bundle(bundle_path: str | Path, data: Sequence[str | Path] | None = None,
                    prompts: str = "auto", gates: GateSet | None = None,
                    window: Window | None = None, count: int = 100,
                    report_dir: str | Path | None = None, jitter: float = 0.0,
                    prompts_file: Path | None = None, card=None, threads: int | None = None,
                    steps: Steps | None = None, slices: Sequence[Item] | None = None
                    ) -> ValidationResult:
    """``samedge validate BUNDLE --data DIR --prompts boxes-from-masks --max-dice-drop 0.01``.

    Re-measures every reduced-precision variant in the bundle (encoder and decoder artifacts of
    each backend/precision, measured together as the Predictor runs them) on the given data
    against the FP32 PyTorch model, gates each, and writes the report. Exit code 0/1 via
    ``ValidationResult.exit_code``. The bundle is not modified. Depth models read ``data`` as
    volumes (two stacks of D adjacent slices each); semantic families are gated on their label
    maps' per-class Dice (no prompts).
    """
    steps = steps or Steps(quiet=True)
    bundle_path = Path(bundle_path)
    bundle = Bundle(bundle_path)
    gates = gates or GateSet()
    policy = PromptPolicy(mode=prompts, jitter=jitter, prompts_file=prompts_file,
                          clicks=bundle.model.get("prompt") == "points")
    depth = int(bundle.model.get("depth", 1))
    if slices is None and data is None:
        slices = default_validation(bundle)
    elif slices is None and depth > 1:
        slices = read_stacks(data, depth, window=normalize_window(window))
    elif slices is None:
        slices = load_slices(data, count, normalize_window(window))
    if not slices:
        raise DataSourceError(f"no validation slices in {data}")
    card = _card_for(bundle, card)  # after the data checks: building the model takes seconds
    with steps.step(f"FP32 PyTorch reference on {len(slices)} slices"):
        measured = references_for(card, slices, policy, Steps(quiet=True))
    variants = {}
    worst_cases: list = []
    names = measured.names
    combos = bundle_variants(bundle)
    default = bundle.manifest.get("default_variant") or {}
    chosen = (default.get("backend"), default.get("precision"),
              default.get("decoder_precision", default.get("precision")))
    if chosen[0] in ("onnxruntime", "openvino") and None not in chosen and chosen not in combos:
        # the pipeline's pick may be a mixed pair (INT8 encoder, FP32 decoder)
        combos.append(chosen)
    for backend, encoder, decoder in combos:
        label = variant_label(backend, encoder, decoder)
        precision = decoder if encoder == "fp32" else encoder
        keeper = WorstKeeper(label, measured, k=2)
        with steps.step(f"drift of {label}"):
            drift = measured.measure(bundle, backend, encoder, decoder, threads, observe=keeper)
        if precision != "fp32":
            worst_cases += keeper.cases()
        gate = gates.evaluate(precision, drift.summary()) if precision != "fp32" else None
        variants[label] = validation_entry(drift, gate, names,
                                           {"encoder": encoder, "decoder": decoder})
    passed = all(v["gate"]["passed"] for v in variants.values() if "gate" in v)
    out = Path(report_dir) if report_dir else bundle_path.parent / f"{bundle_path.name}-validation"
    from samedge.calibration.report import write_report

    document = {"model": bundle.model, "artifacts": [], "validation_run": {
        "data": [str(d) for d in data] if data else "bundled real slices", "prompts": prompts,
        "variants": variants, "passed": passed}}
    write_report(out, bundle.manifest, extras={"validation_run": document["validation_run"]},
                 worst_cases=worst_cases)
    return ValidationResult(passed, variants, out)


def bundle_variants(bundle: Bundle) -> list[tuple[str, str, str]]:
    """(backend, encoder precision, decoder precision) the Predictor can run from this bundle:
    FP32, and per reduced precision every graph that has it (the other graph FP32) — so an INT8
    encoder whose INT8 decoder was kept out is still validated, with the FP32 decoder. Reduced
    precisions count in the backend's own format; the FP32 partner may be any format it reads
    (OpenVINO runs an FP32 ONNX decoder beside an INT8 IR encoder)."""
    from samedge.runtime.bundle import BACKEND_FORMATS

    have = {(a["graph"], a["format"], a["precision"]) for a in bundle.artifacts}
    order = {"fp32": 0, "fp16": 1, "int8": 2}
    out = []
    for backend, fmt in (("onnxruntime", "onnx"), ("openvino", "openvino_ir")):
        readable = BACKEND_FORMATS[backend]

        def runs(graph: str, precision: str) -> bool:
            formats = readable if precision == "fp32" else (fmt,)
            return any((graph, f, precision) in have for f in formats)

        precisions = sorted({p for g, f, p in have if f == fmt and g in GRAPHS},
                            key=lambda p: (order.get(p, 9), p))
        if not precisions:
            continue  # nothing of this backend's own format in the bundle
        for precision in dict.fromkeys(["fp32", *precisions]):
            encoder = precision if runs("encoder", precision) else "fp32"
            decoder = precision if runs("decoder", precision) else "fp32"
            if runs("encoder", encoder) and runs("decoder", decoder):
                out.append((backend, encoder, decoder))
    return out


def variant_label(backend: str, encoder: str, decoder: str) -> str:
    if encoder == decoder:
        return f"{backend} {encoder}"
    return f"{backend} encoder {encoder} + decoder {decoder}"


# -- pipeline -------------------------------------------------------------------------------------
# `samedge pipeline`'s INT8 budget on 2 cores: 16 calibration slices, whole blocks as search units
# ranked on 1 slice, 4 tuning slices, at most 8 real evaluations per graph (205 s for LiteMedSAM's
# encoder and decoder, measured on shared cores; see README). `samedge build` defaults to per-op
# units, 2 ranking slices, 8 tuning slices and the calibration set recorded by `calibrate`.
PIPELINE_CALIBRATION = 16
# A reduced precision becomes the default only when this much faster than FP32 (one encoder call
# + one box, medians of interleaved rounds): smaller differences are noise on shared cores.
SPEED_MARGIN = 0.05
PIPELINE_SEARCH = SearchOptions(granularity="block", ranking_count=1, tune_count=4,
                                max_evaluations=8)


@dataclass
class VariantRow:
    """One (encoder, decoder) precision pair of one backend, as the pipeline reports it."""

    backend: str
    encoder: str
    decoder: str
    summary: dict | None
    gate: GateResult | None
    encoder_s: float | None = None
    decoder_s: float | None = None  # one box, or one segment() call for semantic families
    in_bundle: bool = True
    default: bool = False

    @property
    def label(self) -> str:
        return variant_label(self.backend, self.encoder, self.decoder)

    @property
    def passed(self) -> bool:
        return self.gate is not None and self.gate.passed


@dataclass
class PipelineQuantization:
    build: BuildResult | None
    rows: list[VariantRow]
    default: VariantRow
    messages: list[str]
    seconds: float
    manifest: dict
    report: Path | None = None

    @property
    def latency(self) -> dict[str, float]:
        return {r.label: r.encoder_s for r in self.rows if r.encoder_s is not None}


def int8_instructions() -> list[str]:
    """CPU features that make INT8 fast on CPU (x86 VNNI/AMX), from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8", "asimddp",
                           "i8mm"})


def first_interaction(predictor: Predictor, item: Item) -> tuple[Callable, Callable]:
    """(encode, decode) of a first interaction with ``item``: ``set_image`` (``set_volume`` of a
    stack for depth models), then one box on it (prompt families) or one ``segment()`` call."""
    from samedge.calibration.prompts import auto_boxes

    if isinstance(item, Slice):
        encode = lambda: predictor.set_image(item.image)  # noqa: E731
    else:
        encode = lambda: predictor.set_volume([s.image for s in item])  # noqa: E731
    if predictor.semantic:
        return encode, predictor.segment
    box = auto_boxes(centre(item).image)[0]
    return encode, lambda: predictor.predict(boxes=box)


def time_variants(bundle: Bundle, rows: Sequence[VariantRow], item: Item,
                  threads: int | None, repeats: int = 3) -> None:
    """Median encoder call and one decoder call (one box, or one ``segment()``) per row, rounds
    interleaved across rows (the cores are shared, so the variants see the same load)."""
    calls = [first_interaction(Predictor(bundle, backend=r.backend, precision=r.encoder,
                                         threads=threads, decoder_precision=r.decoder), item)
             for r in rows]
    for encode, decode in calls:  # warm-up
        encode()
        decode()
    encoder: list[list[float]] = [[] for _ in rows]
    decoder: list[list[float]] = [[] for _ in rows]
    for _ in range(repeats):
        for i, (encode, decode) in enumerate(calls):
            t0 = time.perf_counter()
            encode()
            t1 = time.perf_counter()
            decode()
            encoder[i].append(t1 - t0)
            decoder[i].append(time.perf_counter() - t1)
    for row, enc, dec in zip(rows, encoder, decoder):
        row.encoder_s, row.decoder_s = float(np.median(enc)), float(np.median(dec))


def drop_variants(bundle_path: Path, keys: Sequence[tuple[str, str, str]],
                  why: dict[str, Any]) -> dict:
    """Take artifacts out of a bundle (atomically), recording why in its ``builds`` history."""
    bundle = Bundle(bundle_path)
    with BundleWriter(bundle_path) as writer:
        writer.adopt(bundle_path, [a for a in bundle.artifacts
                                   if (a["graph"], a["format"], a["precision"]) not in keys])
        fields = {k: copy.deepcopy(bundle.manifest[k]) for k in (*MANIFEST_KEEP, "builds")
                  if k in bundle.manifest}
        fields.setdefault("builds", []).append({
            "step": "pipeline gate", "added": [],
            "rejected": [{"variant": label, "why": reason} for label, reason in why.items()]})
        return writer.commit(fields)


def quantize_for_pipeline(bundle_path: str | Path, card, slices: Sequence[Item],
                          threads: int | None = None, steps: Steps | None = None,
                          calibration: CalibrationSet | None = None,
                          search: SearchOptions | None = None, repeats: int = 3,
                          measured: dict[tuple[str, str], VariantDrift] | None = None,
                          int8: bool = True) -> PipelineQuantization:
    """What ``samedge pipeline`` does after export: gate the FP16 IR it measured (``measured``:
    the pipeline's drift per (backend, precision)), add OpenVINO INT8 encoder and decoder only
    where they pass their gate, then time every passing OpenVINO variant in interleaved rounds and
    record the fastest as the bundle's ``default_variant`` — on CPUs without VNNI/AMX usually
    FP32, and the messages say so and why. ``slices``: the validation items (stacks of D
    adjacent slices for depth models), the same the pipeline measured its drift on."""
    steps = steps or Steps(quiet=True)
    started = time.perf_counter()
    bundle_path = Path(bundle_path)
    gates = GateSet()
    messages: list[str] = []
    rows: list[VariantRow] = []
    measured = measured or {}
    for precision in ("fp32", "fp16"):
        drift = measured.get(("openvino", precision))
        if drift is not None:
            summary = drift.summary()
            rows.append(VariantRow("openvino", precision, precision, summary,
                                   gates.evaluate(precision, summary)))
    failed = [r for r in rows if r.encoder != "fp32" and not r.passed]
    if failed:
        why = {f"{g} openvino_ir {r.encoder}": r.gate.reasons for r in failed for g in GRAPHS}
        drop_variants(bundle_path, [(g, "openvino_ir", r.encoder) for r in failed
                                    for g in GRAPHS], why)
        for r in failed:
            r.in_bundle = False
            messages.append(f"{r.label} kept out of the bundle: {'; '.join(r.gate.reasons)}")

    result = None
    if int8:
        calibration = calibration or CalibrationSet(None, count=PIPELINE_CALIBRATION)
        result = build_variants(bundle_path, "int8", "openvino", GRAPHS, calibration, slices,
                                card=card, threads=threads, steps=steps,
                                search=search or PIPELINE_SEARCH, layer_errors=False)
        by_graph = {c.graph: c for c in result.added + result.rejected}
        for graph in GRAPHS:
            candidate = by_graph.get(graph)
            if candidate is None:
                continue
            encoder = "int8" if graph == "encoder" else "fp32"
            decoder = "int8" if graph == "decoder" else "fp32"
            row = VariantRow("openvino", encoder, decoder,
                             candidate.drift.summary() if candidate.drift else None,
                             candidate.gate,
                             in_bundle=any(candidate is c for c in result.added))
            rows.append(row)
            search_facts = ""
            if candidate.search is not None:
                s = candidate.search
                search_facts = (f"; the accuracy search kept {len(s.float_units)} of "
                                f"{len(s.float_units) + len(s.int8_units)} units in float")
            if row.in_bundle:
                messages.append(f"INT8 {graph} added: mean Dice {row.summary['dice_mean']:.4f}, "
                                f"worst {row.summary['dice_min']:.4f} vs FP32 PyTorch"
                                f"{search_facts}")
            else:
                why = candidate.why_out()
                holding = ""
                if candidate.search is not None:
                    top = candidate.search.describe(3)["most_sensitive"]
                    holding = "; most sensitive: " + ", ".join(
                        f"{o['op']} ({100 * o['share']:.0f} %)" for o in top)
                messages.append(f"INT8 {graph} kept out of the bundle: {why}{search_facts}"
                                f"{holding}")
        if result.combined:
            summary = result.combined["drift"].summary()
            row = VariantRow("openvino", "int8", "int8", summary, result.combined["gate"],
                             in_bundle=result.combined["gate"].passed)
            rows.append(row)

    bundle = Bundle(bundle_path)
    probe = max(slices, key=lambda s: centre(s).image.shape[0] * centre(s).image.shape[1])
    timed = [r for r in rows if r.in_bundle and r.passed]
    if timed:
        with steps.step(f"time {len(timed)} gate-passing OpenVINO variants, {repeats} "
                        "interleaved rounds"):
            time_variants(bundle, timed, probe, threads, repeats)
    if not timed:  # nothing measured (no OpenVINO): FP32 stays the default, untimed
        timed = [VariantRow("openvino", "fp32", "fp32", None, None)]

    def cost(row: VariantRow) -> float:  # one encoder call + one decoder call: a first look
        return (row.encoder_s or 0.0) + (row.decoder_s or 0.0)

    decode = "one segment() call" if card.decoder == "semantic" else "one box"
    fp32 = next((r for r in timed if r.encoder == r.decoder == "fp32"), None)
    fastest = min(timed, key=cost)
    default = fastest
    if fp32 is not None and cost(fastest) > (1.0 - SPEED_MARGIN) * cost(fp32):
        default = fp32  # not measurably faster: keep the exact variant
    default.default = True
    fast = int8_instructions()
    cpu = (f"this CPU has {', '.join(fast)}" if fast else
           "this CPU has no INT8 dot-product instructions (no AVX-512 VNNI, AVX-VNNI or AMX), "
           "so OpenVINO computes INT8 layers no faster than FP32")
    if fp32 is not None and cost(fp32):
        slow = [r for r in timed if r is not fp32 and cost(r) > (1.0 - SPEED_MARGIN) * cost(fp32)]
        if slow:
            times = "; ".join(f"{r.label} {r.encoder_s * 1e3:.0f} ms + {r.decoder_s * 1e3:.1f} ms"
                              for r in [fp32, *slow])
            messages.append(f"not faster than FP32 here (encoder + {decode}, median of "
                            f"{repeats} interleaved rounds; under {SPEED_MARGIN:.0%} counts as "
                            f"noise on shared cores): {times}")
        if any("int8" in (r.encoder, r.decoder) for r in slow):
            messages.append(f"INT8 is no faster than FP32 here: {cpu}")
    messages.append(f"default variant: {default.label} — "
                    + ("the fastest variant that passes its gate" if default is fastest else
                       f"no gate-passing variant is {SPEED_MARGIN:.0%} faster than FP32")
                    + (f" ({default.encoder_s * 1e3:.0f} ms encoder + "
                       f"{default.decoder_s * 1e3:.1f} ms {decode})" if default.encoder_s
                       else ""))
    manifest = bundle.manifest
    manifest["default_variant"] = {
        "backend": default.backend, "precision": default.encoder,
        "decoder_precision": default.decoder,
        "why": "fastest variant that passes its gate on the machine that built the bundle "
               f"(FP32 unless another is {SPEED_MARGIN:.0%} faster)",
        "timed": {r.label: {"encoder_s": r.encoder_s, "decoder_s": r.decoder_s} for r in timed
                  if r.encoder_s is not None},
        "int8_instructions": fast,
    }
    write_manifest(bundle_path, manifest)
    seconds = time.perf_counter() - started
    return PipelineQuantization(result, rows, default, messages, seconds, manifest,
                                result.report if result else None)
