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

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from samedge.calibration.calibset import CalibrationSet, Feeds, PromptPolicy, load_slices
from samedge.calibration.drift import (
    PromptSet,
    ReferenceOutputs,
    VariantDrift,
    measure_variant,
    reference_outputs,
)
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
from samedge.calibration.sources import Slice, bundled_slices
from samedge.calibration.windows import Window, parse_window
from samedge.errors import DataSourceError, SamedgeError
from samedge.export.bundle import BundleWriter, write_json_atomic
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
    or ``validation``."""

    method: str = "search"
    target: Gate = SEARCH_TARGET
    tune_on: str = "calibration"
    tune_count: int = 8
    ranking_count: int = 2
    max_evaluations: int = 10


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

    @property
    def key(self) -> tuple[str, str, str]:
        return self.graph, self.fmt, self.precision

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
            why = c.error or (c.gate.describe() if c.gate else "not measured")
            out.append(f"kept out {c.label()}: {why}")
        return out


# -------------------------------------------------------------------------------------------------
# Measuring candidates through the real Predictor
# -------------------------------------------------------------------------------------------------
def _slice_prompts(slices: Sequence[Slice], policy: PromptPolicy) -> Callable:
    """``reference_outputs`` asks for prompts by image; map images back to their slices."""
    lookup = {id(s.image): s for s in slices}

    def prompts(image: np.ndarray) -> PromptSet:
        return policy.prompt_set(lookup[id(image)])

    return prompts


@dataclass
class Measured:
    slices: list[Slice]
    references: list[tuple[ReferenceOutputs, PromptSet]]


def references_for(card, slices: Sequence[Slice], policy: PromptPolicy, steps: Steps) -> Measured:
    slices = list(slices)
    return Measured(slices, reference_outputs(card, slices, _slice_prompts(slices, policy), steps))


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
              indices: Sequence[int] | None = None) -> VariantDrift:
        """Drift of a candidate (model, or an opened backend) on the probe's slices."""
        backend = model if hasattr(model, "run") else self.open(model)
        original = getattr(self.predictor, self.graph)
        setattr(self.predictor, self.graph, backend)
        pick = range(len(self.measured.slices)) if indices is None else indices
        try:
            return measure_variant(self.bundle, backend.name, label,
                                   [self.measured.slices[i] for i in pick],
                                   [self.measured.references[i] for i in pick],
                                   Steps(quiet=True), predictor=self.predictor)
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
    """Mean squared relative embedding error vs FP32 PyTorch on ``count`` slices."""
    from samedge.runtime.transforms import preprocess

    pre = probe.bundle.preprocessing
    pairs = [(preprocess(s.image, pre)[0], ref.embedding)
             for s, (ref, _) in list(zip(measured.slices, measured.references))[:count]]

    def proxy(model: Any) -> float:
        run = quick_runner(model, probe.threads)
        return float(np.mean([_rel_sq(run({"image": x})["image_embeddings"], want)
                              for x, want in pairs]))

    return proxy


def decoder_proxy(probe: CandidateProbe, feeds: list[dict], reference) -> Callable[[Any], float]:
    """Mean squared relative error of the low-res mask logits vs the FP32 decoder."""
    wants = [reference.run(f)["low_res_masks"] for f in feeds]

    def proxy(model: Any) -> float:
        run = quick_runner(model, probe.threads)
        return float(np.mean([_rel_sq(run(f)["low_res_masks"], want)
                              for f, want in zip(feeds, wants)]))

    return proxy


# -------------------------------------------------------------------------------------------------
# Building one candidate
# -------------------------------------------------------------------------------------------------
def _card_for(bundle: Bundle, card=None):
    if card is not None:
        return card
    from samedge.models import build_model

    model = bundle.model
    options = {}
    checkpoint = (model.get("checkpoint") or {}).get("path")
    if model["family"] != "litemedsam" and checkpoint:
        options["checkpoint"] = checkpoint
    try:
        return build_model(model["family"], **options)
    except SamedgeError as exc:
        raise SamedgeError(f"cannot rebuild the FP32 reference model for this bundle: {exc}",
                           hint="pass the model (card=...) or its checkpoint") from exc


def _feeds_for(graph: str, calibration: CalibrationSet, bundle: Bundle, encoder_backend,
               policy: PromptPolicy) -> Feeds:
    pre = bundle.preprocessing
    if graph == "encoder":
        return calibration.encoder_inputs(pre, int(bundle.model.get("depth", 1)))

    def encode(tensor: np.ndarray) -> np.ndarray:
        return encoder_backend.run({"image": tensor})["image_embeddings"]

    return calibration.decoder_inputs(pre, encode, policy)


def _search(units, realize, probe: CandidateProbe, proxy, options: SearchOptions,
            steps: Steps, label: str):
    """Rank + bisect; returns (model, SearchResult)."""
    t0 = time.perf_counter()
    with steps.step(f"{label}: rank {len(units)} quantized ops by single-op error"):
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
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    names = [p.get_any_name() for p in float_model.inputs]
    target = options.target

    def validation_fn(compiled_model, data) -> tuple[float, list[float]]:
        indices = [int(i) for i in data]
        drift = probe.drift(CompiledBackend(compiled_model), indices=indices)
        summary = drift.summary()
        per_slice: dict[str, list[float]] = {}
        for slice_name, _, value in drift.cases:
            per_slice.setdefault(slice_name, []).append(value)
        return (target.score(summary["dice_mean"], summary["dice_min"]),
                [float(np.mean(v)) for v in per_slice.values()])

    arguments = config.arguments()
    restorer = AdvancedAccuracyRestorerParameters(ranking_subset_size=options.ranking_count,
                                                  max_num_iterations=options.max_evaluations * 8)
    with steps.step("NNCF quantize_with_accuracy_control"):
        return nncf.quantize_with_accuracy_control(
            float_model, nncf.Dataset(feeds, lambda item: {n: item[n] for n in names}),
            nncf.Dataset(list(range(len(probe.measured.slices)))), validation_fn,
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
    mixed = OpenVinoMixed(float_model, quantized)
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

    ``validation``: slices the gate is measured on (default: the bundled real slices, with
    ``prompts`` — auto boxes, plus centre clicks for point-trained families).
    """
    steps = steps or Steps(quiet=True)
    started = time.perf_counter()
    if precision not in PRECISIONS:
        raise SamedgeError(f"precision {precision!r} is not built here", hint=f"use {PRECISIONS}")
    if backend not in TARGETS:
        raise SamedgeError(f"unknown backend {backend!r}", hint=f"use one of {sorted(TARGETS)}")
    bundle_path = Path(bundle_path)
    bundle = Bundle(bundle_path)
    card = _card_for(bundle, card)
    gates = gates or GateSet()
    search = search or SearchOptions()
    nncf_config = nncf_config or NncfConfig()
    calibration = calibration or calibration_from_manifest(bundle.manifest)
    policy = prompts or PromptPolicy(clicks=bundle.model.get("prompt") == "points")
    validation = list(validation) if validation is not None else bundled_slices()
    fmt = TARGETS[backend][precision]
    measure_backend = run_backend(fmt)
    timings: dict[str, float] = {}

    with steps.step(f"FP32 PyTorch reference on {len(validation)} validation slices"):
        measured = references_for(card, validation, policy, Steps(quiet=True))
    tuning = measured
    if precision == "int8" and search.method != "none" and search.tune_on == "calibration":
        tune_slices = [s for _, s in zip(range(search.tune_count), calibration.iter_slices())]
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
                probe.close()
            timings[f"{graph} {precision}"] = time.perf_counter() - t0
            candidates.append(candidate)
            if candidate.files:
                writer.add_artifact(graph, fmt, precision, candidate.files, **candidate.meta)

        # Measure every candidate in the staged bundle through the real Predictor.
        write_json_atomic(stage / MANIFEST_NAME, _provisional(bundle.manifest, writer.artifacts))
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
                candidate.drift = measure_variant(
                    staged, measure_backend, enc, measured.slices, measured.references,
                    Steps(quiet=True), threads, decoder_precision=dec, observe=keeper)
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
                drift = measure_variant(staged, measure_backend, precision, measured.slices,
                                        measured.references, Steps(quiet=True), threads)
            combined = {"drift": drift, "gate": gate.evaluate(drift.summary())}

        added, rejected = [], []
        for candidate in candidates:
            if candidate.gate is not None and candidate.gate.passed:
                added.append(candidate)
            else:
                rejected.append(candidate)
                for file in candidate.files:
                    Path(file).unlink(missing_ok=True)
                writer.artifacts = [a for a in writer.artifacts
                                    if (a["graph"], a["format"], a["precision"]) != candidate.key]
        names = [s.name for s in measured.slices]
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
            "rejected": [{"variant": c.label(), "why": c.error or (c.gate.reasons if c.gate
                                                                   else "not measured")}
                         for c in rejected],
            "seconds": round(time.perf_counter() - started, 1),
        })
        manifest = writer.commit(fields)
    result = BuildResult(bundle_path, manifest, added, rejected, combined, timings)
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
        self._prompts = {s.name: p for s, (_, p) in zip(measured.slices, measured.references)}

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
    from samedge.runtime.transforms import preprocess

    pre = bundle.preprocessing
    tensors = [preprocess(s.image, pre)[0] for s in measured.slices[:slices]]
    if candidate.graph == "encoder":
        feeds = [{"image": t} for t in tensors]
    else:
        encoder = open_backend(backend, bundle.entry_path(bundle.find("encoder", backend, "fp32")),
                               threads)
        feeds = list(CalibrationSet(slices=measured.slices[:slices], augment=False)
                     .decoder_inputs(pre, lambda t: encoder.run({"image": t})["image_embeddings"]))
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


def validation_entry(drift: VariantDrift, gate: GateResult | None, slice_names: Sequence[str],
                     measured_with: dict) -> dict:
    """The manifest's record of one measurement: summary, per-prompt Dice, gate verdict."""
    entry = {
        "slices": list(slice_names),
        "reference": "FP32 PyTorch, same preprocessing",
        "measured_with": measured_with,
        **drift.summary(),
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
        extras["rejected"][c.label()] = c.error or (c.gate.reasons if c.gate else [])
    return extras


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
                     family: str = "litemedsam", steps: Steps | None = None, **model_options
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
        from samedge.export.exporter import export_bundle
        from samedge.models import build_model

        with steps.step(f"build {family} model"):
            card = build_model(family, **model_options)
        sample = [s for _, s in zip(range(3), calibration.iter_slices())]
        export_bundle(card, bundle_path, [s.image for s in sample], steps=steps,
                      image_names=[s.name for s in sample])
    with steps.step(f"read {calibration.count} calibration slices (one at a time)"):
        stats = calibration_statistics(calibration, Bundle(bundle_path, verify=False))
    manifest = Bundle(bundle_path).manifest
    manifest["calibration"] = {**calibration.describe(), "bundled": data is None,
                               "modality": modality, "statistics": stats,
                               "preprocessing": "samedge.runtime.transforms.preprocess"}
    write_json_atomic(bundle_path / MANIFEST_NAME, manifest)
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
                    steps: Steps | None = None, slices: Sequence[Slice] | None = None
                    ) -> ValidationResult:
    """``samedge validate BUNDLE --data DIR --prompts boxes-from-masks --max-dice-drop 0.01``.

    Re-measures every reduced-precision variant in the bundle (encoder and decoder artifacts of
    each backend/precision, measured together as the Predictor runs them) on the given data
    against the FP32 PyTorch model, gates each, and writes the report. Exit code 0/1 via
    ``ValidationResult.exit_code``. The bundle is not modified.
    """
    steps = steps or Steps(quiet=True)
    bundle_path = Path(bundle_path)
    bundle = Bundle(bundle_path)
    card = _card_for(bundle, card)
    gates = gates or GateSet()
    policy = PromptPolicy(mode=prompts, jitter=jitter, prompts_file=prompts_file,
                          clicks=bundle.model.get("prompt") == "points")
    if slices is None:
        slices = (load_slices(data, count, normalize_window(window)) if data is not None
                  else bundled_slices())
    if not slices:
        raise DataSourceError(f"no validation slices in {data}")
    with steps.step(f"FP32 PyTorch reference on {len(slices)} slices"):
        measured = references_for(card, slices, policy, Steps(quiet=True))
    variants = {}
    worst_cases: list = []
    names = [s.name for s in slices]
    for backend, precision in bundle_variants(bundle):
        label = f"{backend} {precision}"
        keeper = WorstKeeper(label, measured, k=2)
        with steps.step(f"drift of {label}"):
            drift = measure_variant(bundle, backend, precision, measured.slices,
                                    measured.references, Steps(quiet=True), threads,
                                    observe=keeper)
        if precision != "fp32":
            worst_cases += keeper.cases()
        gate = gates.evaluate(precision, drift.summary()) if precision != "fp32" else None
        variants[label] = validation_entry(drift, gate, names,
                                           {"encoder": precision, "decoder": precision})
    passed = all(v["gate"]["passed"] for v in variants.values() if "gate" in v)
    out = Path(report_dir) if report_dir else bundle_path.parent / f"{bundle_path.name}-validation"
    from samedge.calibration.report import write_report

    document = {"model": bundle.model, "artifacts": [], "validation_run": {
        "data": [str(d) for d in data] if data else "bundled real slices", "prompts": prompts,
        "variants": variants, "passed": passed}}
    write_report(out, bundle.manifest, extras={"validation_run": document["validation_run"]},
                 worst_cases=worst_cases)
    return ValidationResult(passed, variants, out)


def bundle_variants(bundle: Bundle) -> list[tuple[str, str]]:
    """(backend, precision) pairs the bundle can run with one precision for both graphs."""
    have = {(a["graph"], a["format"], a["precision"]) for a in bundle.artifacts}
    out = []
    for backend, formats in (("onnxruntime", ("onnx",)), ("openvino", ("openvino_ir",))):
        precisions = sorted({p for g, f, p in have if f in formats and g == "encoder"})
        for precision in precisions:
            if any(("decoder", f, precision) in have for f in formats):
                out.append((backend, precision))
    return out


# -- pipeline -------------------------------------------------------------------------------------
@dataclass
class PipelineQuantization:
    build: BuildResult
    latency: dict[str, float]
    default: tuple[str, str]
    messages: list[str]


def time_encoder(bundle: Bundle, backend: str, precision: str, image: np.ndarray,
                 threads: int | None, repeats: int = 5) -> float:
    """Median ``set_image`` seconds after one warm-up (interleave calls to compare variants)."""
    predictor = Predictor(bundle, backend=backend, precision=precision, threads=threads,
                          decoder_precision="fp32")
    predictor.set_image(image)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.set_image(image)
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def quantize_for_pipeline(bundle_path: str | Path, card, slices: Sequence[Slice],
                          threads: int | None = None, steps: Steps | None = None,
                          calibration: CalibrationSet | None = None,
                          search: SearchOptions | None = None, repeats: int = 5
                          ) -> PipelineQuantization:
    """What ``samedge pipeline`` adds after export: OpenVINO INT8 (encoder; decoder too) only
    when it passes the gate, then the fastest gate-passing OpenVINO variant becomes the bundle's
    ``default_variant`` — on CPUs without VNNI that is usually FP32, and the messages say so."""
    steps = steps or Steps(quiet=True)
    calibration = calibration or CalibrationSet(None, count=32)
    result = build_variants(bundle_path, "int8", "openvino", GRAPHS, calibration, slices,
                            card=card, threads=threads, steps=steps, search=search)
    bundle = Bundle(bundle_path)
    probe = max(slices, key=lambda s: s.image.shape[0] * s.image.shape[1]).image
    candidates = [("openvino", p) for p in ("fp32", "fp16", "int8")
                  if _has(bundle, "encoder", "openvino_ir", p)]
    latency: dict[str, float] = {f"{b} {p}": [] for b, p in candidates}
    for _ in range(repeats):  # interleaved: the cores are shared
        for backend, precision in candidates:
            latency[f"{backend} {precision}"].append(
                time_encoder(bundle, backend, precision, probe, threads, repeats=1))
    latency = {k: float(np.median(v)) for k, v in latency.items()}
    fastest = min(latency, key=latency.get)
    messages = result.lines()
    if "openvino int8" in latency and latency["openvino int8"] > latency["openvino fp32"]:
        messages.append(
            f"INT8 passes its gate but is slower than FP32 on this CPU "
            f"({latency['openvino int8'] * 1e3:.0f} ms vs {latency['openvino fp32'] * 1e3:.0f} ms "
            "per encoder call; no AVX-512 VNNI/AMX): the default stays the fastest passing "
            f"variant, {fastest}")
    default = tuple(fastest.split())
    manifest = bundle.manifest
    manifest["default_variant"] = {"backend": default[0], "precision": default[1],
                                   "encoder_latency_s": latency,
                                   "why": "fastest variant that passes its gate on this machine"}
    write_json_atomic(Path(bundle_path) / MANIFEST_NAME, manifest)
    return PipelineQuantization(result, latency, default, messages)


def _has(bundle: Bundle, graph: str, fmt: str, precision: str) -> bool:
    return any((a["graph"], a["format"], a["precision"]) == (graph, fmt, precision)
               for a in bundle.artifacts)
