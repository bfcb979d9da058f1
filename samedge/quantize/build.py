"""``samedge build``: quantize or convert a bundle's FP32 graphs, measure, gate, commit atomically.

Every candidate is measured through the real runtime ``Predictor`` against the FP32 PyTorch model
and only passing artifacts are committed, each with its drift, gate verdict, calibration facts
and the units kept in float. Staging goes through ``BundleWriter``, so an interrupted build
leaves the previous bundle untouched.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from samedge.data.items import read_items
from samedge.data.prompts import PromptPolicy
from samedge.data.slices import Slice
from samedge.errors import BackendUnavailableError, SamedgeError
from samedge.export.bundle import BundleWriter, write_manifest
from samedge.progress import Steps
from samedge.quantize.builders import (
    fp16_variant,
    onnx_bf16,
    openvino_bf16,
    openvino_int8,
    qdq_int8,
)
from samedge.quantize.calibset import CalibrationSet
from samedge.quantize.candidates import (
    MANIFEST_KEEP,
    BuildResult,
    Candidate,
    CandidateProbe,
    SearchOptions,
    candidate_layer_errors,
    decoder_proxy,
    encoder_proxy,
    feeds_for,
    quiet_tools,
)
from samedge.quantize.openvino_nncf import (
    NncfConfig,
)
from samedge.runtime.backends import open_backend
from samedge.runtime.bundle import NATIVE_FORMAT, Bundle, backend_for
from samedge.validation.gate import Gate, GateSet, with_margin
from samedge.validation.rebuild import reference_card
from samedge.validation.records import WorstKeeper, validation_entry
from samedge.validation.references import Measured, references_for
from samedge.validation.validate import GRAPHS

PRECISIONS = ("int8", "fp16", "bf16", "int8-bf16")
# ONNX BF16 is TensorRT's graph, measured here through its FP32 stand-in; INT8 + BF16 is
# OpenVINO's (an INT8 IR's float parts under a bf16 hint)
ONNX_PRECISIONS = ("int8", "fp16", "bf16")


# Backend → (artifact format written, backend that executes it for validation here).
TARGETS = {
    "openvino": {p: NATIVE_FORMAT["openvino"] for p in PRECISIONS},
    "onnxruntime": {p: NATIVE_FORMAT["onnxruntime"] for p in ONNX_PRECISIONS},
}
# `build --backend tensorrt`: the ONNX graphs above (built first where missing), then engines
# (samedge.quantize.engines).
BACKENDS = (*TARGETS, "tensorrt")


# -------------------------------------------------------------------------------------------------
# The build
# -------------------------------------------------------------------------------------------------
def check_request(precision: str, backend: str) -> None:
    """Refuse a precision/backend pair this version does not build, before any work."""
    if precision not in PRECISIONS:
        raise SamedgeError(f"precision {precision!r} is not built here", hint=f"use {PRECISIONS}")
    if backend not in BACKENDS:
        raise SamedgeError(f"unknown backend {backend!r}", hint=f"use one of {sorted(BACKENDS)}")
    if precision not in TARGETS.get(backend, TARGETS["onnxruntime"]):
        raise SamedgeError(f"{precision} is built for OpenVINO only",
                           hint="its float parts run under OpenVINO's bf16 hint; TensorRT and "
                                "ONNX Runtime take --precision bf16 or int8")


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
    engine_options=None,
) -> BuildResult:
    """Add ``precision`` variants for ``backend`` to the bundle; only gate-passing ones stay.

    ``validation``: slices (stacks of D adjacent slices for depth models) the gate is measured
    on (default: the bundled real slices or stacks, with ``prompts`` — auto boxes, plus centre
    clicks for point-trained families; semantic families need no prompt).
    """
    steps = steps or Steps(quiet=True)
    started = time.perf_counter()
    check_request(precision, backend)
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown or not graphs:
        raise SamedgeError(f"unknown graph(s) {', '.join(unknown) or '(none)'}",
                           hint="use encoder, decoder or encoder,decoder")
    if search is not None and search.method == "nncf" and "bf16" in precision:
        raise SamedgeError("accuracy control 'nncf' quantizes; BF16 variants are searched by "
                           "samedge's search", hint="use --search search (or none)")
    if search is not None and search.method == "nncf" and backend != "openvino":
        raise SamedgeError("accuracy control 'nncf' (quantize_with_accuracy_control) works on "
                           "OpenVINO models only", hint="use --search search for ONNX graphs")
    if backend == "tensorrt":
        return _build_tensorrt(bundle_path, precision, graphs, calibration, validation, prompts,
                               gates, search, nncf_config, ort_calibration, card, threads, steps,
                               report, layer_errors, engine_options)
    fmt = TARGETS[backend][precision]
    bf16 = "bf16" in precision and fmt == "openvino_ir"  # OpenVINO's bf16 hint
    if bf16:  # before any slow work: drift measured in emulated f32 would say nothing
        from samedge.quantize.bf16 import require_bf16

        require_bf16()
    bundle_path = Path(bundle_path)
    bundle = Bundle(bundle_path)
    card = reference_card(bundle, card)
    gates = gates or GateSet()
    search = search or SearchOptions()
    margin = with_margin(gates.for_precision(precision))
    search = replace(search, target=at_least(search.target, margin) if search.target else margin)
    nncf_config = nncf_config or NncfConfig()
    calibration = calibration or calibration_from_manifest(bundle.manifest)
    policy = prompts or PromptPolicy(clicks=bundle.model.get("prompt") == "points")
    validation = list(validation) if validation is not None else \
        read_items(None, int(bundle.model.get("depth", 1)))
    measure_backend = backend_for(fmt)
    timings: dict[str, float] = {}

    with steps.step(f"FP32 PyTorch reference on {len(validation)} validation slices"):
        measured = references_for(card, validation, policy, Steps(quiet=True))
    tuning = measured
    searched = precision != "fp16" and search.method != "none"
    if searched and search.tune_on == "calibration":
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
            feeds = feeds_for(graph, calibration, bundle, encoder_fp32, policy)
            probe = CandidateProbe(bundle, graph, measure_backend, tuning, threads,
                                   "bf16" if bf16 else None)
            tools = quiet_tools(steps.quiet)
            tools.__enter__()
            try:
                if precision == "fp16":
                    candidate = fp16_variant(graph, bundle, stage, fmt, feeds, steps)
                else:
                    if graph == "encoder":
                        proxy = encoder_proxy(probe, tuning, search.ranking_count)
                    else:
                        ranking = feeds.take(search.ranking_count)
                        fp32 = open_backend(measure_backend, bundle.entry_path(
                            bundle.find("decoder", measure_backend, "fp32")), threads)
                        proxy = decoder_proxy(probe, ranking, fp32)
                    # OpenVINO candidates run as the bundle will; Q/DQ ONNX is TensorRT's graph,
                    # whose speed ONNX Runtime on this CPU does not tell
                    timed = fmt == "openvino_ir" and search.times_splits(precision)
                    timing_feed = feeds.take(1)[0] if timed else None
                    if precision == "bf16" and fmt == "onnx":
                        candidate = onnx_bf16(graph, bundle, stage, probe, proxy, search, steps)
                    elif bf16:
                        candidate = openvino_bf16(graph, bundle, stage, precision, probe, proxy,
                                                  search, steps, timing_feed)
                    elif fmt == "openvino_ir":
                        candidate = openvino_int8(graph, bundle, stage, feeds, probe, proxy,
                                                  search, nncf_config, steps, timing_feed)
                    else:
                        candidate = qdq_int8(graph, bundle, stage, feeds, probe, proxy, search,
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
    if report:
        from samedge.validation.report import write_report

        result.report = write_report(bundle_path / "report", manifest,
                                     extras=report_extras(result, measured),
                                     worst_cases=worst_cases, layer_errors=layers).folder
    return result


def _provisional(manifest: dict, artifacts: list[dict]) -> dict:
    data = {k: v for k, v in manifest.items() if k != "artifacts"}
    data["artifacts"] = artifacts
    return data


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
    """The search target, raised where ``gate`` (the admission gate with its margin) is stricter:
    a target given by a caller never aims closer to the gate than half its allowance."""
    return replace(target, max_mean_dice_drop=min(target.max_mean_dice_drop,
                                                  gate.max_mean_dice_drop),
                   min_worst_dice=max(target.min_worst_dice, gate.min_worst_dice))


def require_tensorrt(precision: str) -> None:
    """``build --backend tensorrt`` builds engines, which needs a supported TensorRT here."""
    from samedge.export.tensorrt import _tensorrt
    from samedge.runtime.backends.trt_compat import check_supported

    try:
        check_supported(_tensorrt().__version__)
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(
            f"cannot build TensorRT {precision} engines here: {exc.args[0]}",
            hint=(exc.hint + "; " if exc.hint else "") + "TensorRT engines are built on the "
                 "target GPU/Jetson that runs them. On this machine `samedge build BUNDLE "
                 f"--backend onnxruntime --precision {precision}` builds and validates the graph "
                 "TensorRT consumes ("
                 + {"int8": "explicit Q/DQ INT8 ONNX",
                    "bf16": "mixed BF16 ONNX, measured through its FP32 stand-in"}.get(
                     precision, "mixed FP16 ONNX, LayerNorm/softmax in FP32")
                 + "); run `--backend tensorrt` on the target to turn it into an engine",
        ) from exc


def _build_tensorrt(bundle_path, precision, graphs, calibration, validation, prompts, gates,
                    search, nncf_config, ort_calibration, card, threads, steps, report,
                    layer_errors, engine_options) -> BuildResult:
    """``build --backend tensorrt``: the ONNX graphs of ``precision`` the bundle lacks (built and
    gated on ONNX Runtime, as ``--backend onnxruntime`` does), then engines from them."""
    from samedge.export.tensorrt import EngineOptions
    from samedge.quantize.engines import build_engines

    require_tensorrt(precision)
    bundle = Bundle(bundle_path)
    have = {(a["graph"], a["format"], a["precision"]) for a in bundle.artifacts}
    missing = [g for g in graphs if (g, "onnx", precision) not in have]
    onnx_step = None
    if missing:
        onnx_step = build_variants(bundle_path, precision, "onnxruntime", missing, calibration,
                                   validation, prompts, gates, search, nncf_config,
                                   ort_calibration, card, threads, steps, report=False,
                                   layer_errors=layer_errors)
        bundle = Bundle(bundle_path)
    policy = prompts or PromptPolicy(clicks=bundle.model.get("prompt") == "points")
    items = list(validation) if validation is not None else \
        read_items(None, int(bundle.model.get("depth", 1)))
    return build_engines(bundle_path, precision, graphs, items, policy, gates or GateSet(),
                         engine_options or EngineOptions(), card, threads,
                         steps or Steps(quiet=True), report, onnx_step)
