"""Candidate graphs of one precision and how they are probed while the search runs.

A probe compiles a candidate once and measures the cheap proxy (embedding or mask-logit error)
the search orders units by; the real metric (mask Dice through the runtime) decides.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from samedge.data.prompts import PromptPolicy
from samedge.errors import SamedgeError
from samedge.export.openvino import opt_out_of_telemetry
from samedge.progress import Steps
from samedge.quantize.calibset import CalibrationSet, Feeds
from samedge.quantize.openvino_nncf import (
    NncfConfig,
    save_openvino,
)
from samedge.quantize.search import (
    SearchResult,
    TimeRounds,
    accuracy_search,
    rank_units,
)
from samedge.runtime.backends import open_backend
from samedge.runtime.bundle import Bundle
from samedge.runtime.cpu import bf16_instructions, int8_instructions
from samedge.runtime.predictor import Predictor
from samedge.speed.timing import interleaved
from samedge.validation.drift import SemanticDrift, VariantDrift
from samedge.validation.gate import Gate, GateResult
from samedge.validation.references import Measured


# -------------------------------------------------------------------------------------------------
# Options and results
# -------------------------------------------------------------------------------------------------
@dataclass
class SearchOptions:
    """Accuracy control: ``method`` "search" (samedge's: rank ops by single-op INT8 error, bisect
    on the real metric), "nncf" (``nncf.quantize_with_accuracy_control``, OpenVINO only) or
    "none" (plain PTQ). ``target`` is what the search aims for (default and at the loosest: the
    admission gate with half its allowance kept for new data, ``gate.with_margin`` — INT8: mean
    Dice ≥ 0.995, worst ≥ 0.95); ``tune_on`` which slices it measures:
    ``calibration`` (``tune_count`` slices of the calibration set, keeping validation held out)
    or ``validation``. ``granularity`` (OpenVINO): ``op`` switches each quantized op (with the ops
    sharing its input quantizer), ``block`` whole blocks — coarser, about 4× fewer units to rank,
    for a time budget (``samedge pipeline``). ``speed``: whether the passing splits the search
    visits are timed against each other on the OpenVINO candidates (:meth:`times_splits`)."""

    method: str = "search"
    target: Gate | None = None
    tune_on: str = "calibration"
    tune_count: int = 8
    ranking_count: int = 2
    max_evaluations: int = 10
    granularity: str = "op"
    speed: str = "auto"

    def times_splits(self, precision: str, flags: frozenset[str] | None = None) -> bool:
        """Whether the search times the passing splits (``speed``): ``auto`` where the reduced
        arithmetic can pay on this CPU — INT8 dot products (VNNI, AMX-INT8) for ``int8``, BF16
        instructions for the BF16 variants — ``on`` always, ``off`` never."""
        if self.speed not in ("auto", "on", "off"):
            raise SamedgeError(f"search speed {self.speed!r}: use auto, on or off")
        if self.speed != "auto":
            return self.speed == "on"
        if "bf16" in precision:
            return bool(bf16_instructions(flags))
        return precision == "int8" and bool(int8_instructions(flags))


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
                 threads: int | None, inference_precision: str | None = None):
        self.bundle, self.graph, self.backend = bundle, graph, backend
        self.measured, self.threads = measured, threads
        # OpenVINO candidates of BF16 variants run with the hint they will be validated with
        self.options = {"inference_precision": inference_precision} if inference_precision else {}
        self.predictor = Predictor(bundle, backend=backend, precision="fp32", threads=threads)
        if graph == "decoder":  # the FP32 encoder's output does not change between candidates
            self.predictor.encoder = _Memo(self.predictor.encoder)
        self._tmp = Path(tempfile.mkdtemp(prefix="samedge-candidate-"))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def open(self, model: Any, name: str = "candidate"):
        """A runtime backend for an ``ov.Model`` or ``onnx.ModelProto`` (written to a temp file,
        then opened exactly as the bundle's files are; backends open at once need own ``name``s,
        since OpenVINO may map the weights file)."""
        import onnx

        if isinstance(model, onnx.ModelProto):
            path = self._tmp / f"{name}.onnx"
            onnx.save(model, str(path))
            return open_backend("onnxruntime", path, self.threads)
        path = self._tmp / f"{name}.xml"
        save_openvino(model, path)
        return open_backend("openvino", path, self.threads, **self.options)

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


def quick_runner(model: Any, threads: int | None,
                 inference_precision: str = "f32") -> Callable[[dict], dict]:
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

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision}
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
        run = quick_runner(model, probe.threads, **probe.options)
        return float(np.mean([_rel_sq(run({"image": x})["image_embeddings"][part], want)
                              for x, want, part in pairs]))

    return proxy


def decoder_proxy(probe: CandidateProbe, feeds: list[dict], reference) -> Callable[[Any], float]:
    """Mean squared relative error of the decoder's logits (low-res masks, or a semantic
    decoder's class logits: its first output) vs the FP32 decoder."""
    name = reference.output_names[0]
    wants = [reference.run(f)[name] for f in feeds]

    def proxy(model: Any) -> float:
        run = quick_runner(model, probe.threads, **probe.options)
        return float(np.mean([_rel_sq(run(f)[name], want) for f, want in zip(feeds, wants)]))

    return proxy


def feeds_for(graph: str, calibration: CalibrationSet, bundle: Bundle, encoder_backend,
               policy: PromptPolicy) -> Feeds:
    pre, depth = bundle.preprocessing, int(bundle.model.get("depth", 1))
    if graph == "encoder":
        return calibration.encoder_inputs(pre, depth)

    def encode(tensor: np.ndarray) -> np.ndarray:
        return encoder_backend.run({"image": tensor})["image_embeddings"]

    if bundle.model.get("decoder") == "semantic":
        return calibration.semantic_decoder_inputs(pre, encode, depth)
    return calibration.decoder_inputs(pre, encode, policy, depth=depth)


SETTLE_S = 0.05  # pause before each timed call: the previous candidate's threads go idle


def split_timer(probe: CandidateProbe, feed: dict[str, np.ndarray]) -> TimeRounds:
    """Times candidate graphs on one real input, interleaved round by round, each opened once
    through the runtime's own backend (as the bundle will run it)."""
    opened: dict[int, Any] = {}

    def time_rounds(models, rounds: int, first: bool) -> list[list[float]]:
        backends = []
        for model in models:
            if id(model) not in opened:
                opened[id(model)] = probe.open(model, name=f"timed{len(opened)}")
            backends.append(opened[id(model)])
        calls = [[lambda backend=backend: backend.run(feed)] for backend in backends]
        samples = interleaved(calls, rounds, warmup=1 if first else 0, settle_s=SETTLE_S)
        return [per_call[0] for per_call in samples]

    return time_rounds


def run_search(units, realize, probe: CandidateProbe, proxy, options: SearchOptions,
               steps: Steps, label: str, timing_feed: dict[str, np.ndarray] | None = None):
    """Every unit reduced first; where that fails, rank + bisect (+ time the passing splits on
    ``timing_feed`` when given); returns (model, SearchResult)."""
    def rank() -> dict[str, float]:
        with steps.step(f"{label}: rank {len(units)} units by their error alone in reduced "
                        "precision"):
            return rank_units(list(units), realize, proxy, steps)

    target = options.target
    with steps.step(f"{label}: accuracy-controlled search (target: {target.min_mean_dice:.3f} "
                    f"mean, {target.min_worst_dice:.2f} worst)"):
        timer = split_timer(probe, timing_feed) if timing_feed is not None else None
        model, result = accuracy_search(list(units), realize, probe.summary,
                                        lambda s: target.evaluate(s).passed, rank,
                                        steps, options.max_evaluations, time_rounds=timer)
    return model, result


def nncf_accuracy_control(float_model, feeds: Feeds, config: NncfConfig, probe: CandidateProbe,
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


def candidate_layer_errors(bundle: Bundle, candidate: Candidate, backend: str,
                           measured: Measured, threads: int | None, slices: int = 1
                           ) -> list[dict]:
    """Per-layer error of a candidate vs its FP32 graph (same inputs, both on ``backend``)."""
    from dataclasses import asdict

    from samedge.quantize.layer_errors import onnx_layer_errors, openvino_layer_errors

    encoder = None
    if candidate.graph == "decoder":
        encoder = open_backend(backend, bundle.entry_path(bundle.find("encoder", backend, "fp32")),
                               threads)
    sample = CalibrationSet(slices=measured.items[:slices], augment=False)
    feeds = list(feeds_for(candidate.graph, sample, bundle, encoder,
                            PromptPolicy(clicks=bundle.model.get("prompt") == "points")))
    fp32 = bundle.entry_path(bundle.find(candidate.graph, backend, "fp32"))
    if candidate.fmt == "openvino_ir":
        rows = openvino_layer_errors(fp32, candidate.files[0], feeds, threads=threads)
    else:
        rows = onnx_layer_errors(fp32, candidate.files[0], feeds)
    return [asdict(r) for r in rows]


MANIFEST_KEEP = ("model", "preprocessing", "graphs", "validation_inputs", "calibration",
                 "default_variant")


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
