"""TensorRT engines into a bundle: build each on this GPU, measure it, commit only what passes.

An engine is new arithmetic (TensorRT's kernels, fusions and tactics), so it never inherits the
verdict of the ONNX graph it was built from: each engine runs through the runtime ``Predictor`` on
the validation items, is compared with the FP32 reference and gated, and an engine whose gate
fails is not committed. An engine is first measured alone (the other graph the FP32 ONNX on ONNX
Runtime CPU), then as the pair the runtime will run — both graphs as engines: the other graph's
engine of this precision where the bundle has one, else an FP32 engine built for it — so
``Predictor(bundle, backend="tensorrt")`` always finds a measured pair.

The FP32 reference is the PyTorch model where it can be rebuilt here (torch and the checkpoint
present); on a device without them (a Jetson) it is the bundle's FP32 ONNX on ONNX Runtime CPU,
which matched PyTorch within its declared tolerance at export. Each record says which.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Sequence

from samedge.data.prompts import PromptPolicy
from samedge.export.bundle import BundleWriter
from samedge.export.tensorrt import EngineOptions, build_engine
from samedge.progress import Steps
from samedge.quantize.candidates import MANIFEST_KEEP, BuildResult, Candidate
from samedge.runtime.backends import open_backend
from samedge.runtime.bundle import Bundle
from samedge.runtime.predictor import Predictor
from samedge.validation.gate import GateSet
from samedge.validation.records import validation_entry
from samedge.validation.references import Measured, engine_references
from samedge.validation.validate import GRAPHS

ENGINE = "tensorrt_engine"





def _entry(drift, gate, measured: Measured, reference: str, precisions: dict[str, str]) -> dict:
    """The manifest's record of one engine measurement (``precisions``: what ran per graph)."""
    entry = validation_entry(drift, gate, measured.names, precisions)
    entry["reference"] = reference
    return entry


ALONE = "the other graph: FP32 ONNX on ONNX Runtime CPU"


class _Engines:
    """The engines of one build, staged in ``writer``; measured through a Predictor whose graphs
    are swapped for engines (the rest FP32 ONNX on ONNX Runtime CPU)."""

    def __init__(self, bundle: Bundle, writer: BundleWriter, measured: Measured,
                 options: EngineOptions, steps: Steps, threads: int | None):
        self.bundle, self.writer, self.measured = bundle, writer, measured
        self.options, self.steps, self.threads = options, steps, threads
        self.folder = writer.staging / "tensorrt"
        self.folder.mkdir(exist_ok=True)

    def build(self, graph: str, precision: str) -> Candidate:
        source = self.bundle.find(graph, "onnxruntime", precision)
        inputs = {i["name"]: tuple(i["shape"])
                  for i in self.bundle.manifest["graphs"][graph]["inputs"]}
        engine = self.folder / f"{graph}_{precision}.engine"
        with self.steps.step(f"TensorRT {precision} engine for the {graph}"):
            try:
                files = build_engine(self.bundle.entry_path(source), engine, inputs, precision,
                                     self.options, int(self.bundle.model.get("depth", 1)))
            except Exception as exc:  # TensorRT refused this graph: keep it out, say why
                return Candidate(graph, ENGINE, precision, [], error=f"{type(exc).__name__}: "
                                                                     f"{exc}")
        record = json.loads(Path(files[1]).read_text())
        return Candidate(graph, ENGINE, precision, files,
                         {"built_from": source["entry"], "engine": record})

    def existing(self, graph: str, precision: str) -> Path | None:
        for artifact in self.writer.artifacts:
            if (artifact["graph"], artifact["format"], artifact["precision"]) == (
                    graph, ENGINE, precision):
                return self.writer.staging / artifact["entry"]
        return None

    def measure(self, engines: dict[str, Path], label: str):
        predictor = Predictor(self.bundle, backend="onnxruntime", precision="fp32",
                              threads=self.threads)
        for graph, path in engines.items():
            setattr(predictor, graph, open_backend("tensorrt", path, self.threads))
        with self.steps.step(f"drift of {label} on {len(self.measured.items)} items"):
            return self.measured.measure(self.bundle, "tensorrt", predictor=predictor,
                                         label=label)


def build_engines(bundle_path: str | Path, precision: str, graphs: Sequence[str],
                  validation: Sequence, policy: PromptPolicy, gates: GateSet,
                  options: EngineOptions, card=None, threads: int | None = None,
                  steps: Steps | None = None, report: bool = True,
                  onnx_step: BuildResult | None = None) -> BuildResult:
    """``samedge build --backend tensorrt``: one ``precision`` engine per graph of ``graphs``
    whose ONNX graph of that precision is in the bundle, each measured and gated; FP32 partner
    engines where the pair needs one. ``onnx_step``: the ONNX build that ran first for graphs
    the bundle had no such ONNX graph for (its candidates lead the result)."""
    steps = steps or Steps(quiet=True)
    started = time.perf_counter()
    bundle_path = Path(bundle_path)
    bundle = Bundle(bundle_path)
    gate = gates.for_precision(precision)
    built = [g for g in graphs if any((a["graph"], a["format"], a["precision"]) ==
                                      (g, "onnx", precision) for a in bundle.artifacts)]
    added: list[Candidate] = list(onnx_step.added) if onnx_step else []
    rejected: list[Candidate] = list(onnx_step.rejected) if onnx_step else []
    if not built:  # every ONNX graph of this precision was kept out: nothing to build from
        return BuildResult(bundle_path, bundle.manifest, added, rejected)
    measured, reference = engine_references(bundle, validation, policy, card, steps)
    deploy: dict = {}
    with BundleWriter(bundle_path) as writer:
        replaced = {(g, ENGINE, precision) for g in built}
        writer.adopt(bundle_path, [a for a in bundle.artifacts
                                   if (a["graph"], a["format"], a["precision"]) not in replaced])
        engines = _Engines(bundle, writer, measured, options, steps, threads)
        candidates = [engines.build(g, precision) for g in built]
        for c in candidates:
            if c.files:
                c.drift = engines.measure({c.graph: c.files[0]}, c.label())
                c.gate = gate.evaluate(c.drift.summary())
        passing = [c for c in candidates if c.gate and c.gate.passed]
        if len(passing) == 2:
            drift = engines.measure({c.graph: c.files[0] for c in passing},
                                    f"encoder+decoder {precision} engines")
            deploy = {"drift": drift, "gate": gate.evaluate(drift.summary()),
                      "encoder": precision, "decoder": precision}
            if not deploy["gate"].passed:  # as for graphs: the engine drifting less stays
                worse = min(passing, key=lambda c: (c.gate.dice_mean, c.gate.dice_min))
                other = next(c for c in passing if c is not worse)
                worse.held_back = (
                    f"passes alone, but with the {precision} {other.graph} engine the pair "
                    f"drifts beyond the gate ({'; '.join(deploy['gate'].reasons)}); the "
                    f"{other.graph} engine, which drifts less, stays")
                deploy = {}
        kept = [c for c in candidates if c.kept]
        partners: list[Candidate] = []
        if len(kept) == 1:  # pair it with the other graph's engine at this precision, else FP32
            one = kept[0]
            other = next(g for g in GRAPHS if g != one.graph)
            partner_precision = precision
            partner_path = engines.existing(other, precision)
            if partner_path is None:
                partner_precision, partner_path = "fp32", engines.existing(other, "fp32")
            if partner_path is None:
                partner = engines.build(other, "fp32")
                if partner.files:
                    partner.drift = engines.measure({other: partner.files[0]}, partner.label())
                    partners.append(partner)
                    partner_path = partner.files[0]
                else:
                    one.held_back = f"no FP32 {other} engine to pair with: {partner.error}"
            if partner_path is not None:
                drift = engines.measure({one.graph: one.files[0], other: partner_path},
                                        f"{one.label()} + {other} {partner_precision} engine")
                deploy = {"drift": drift, "gate": gate.evaluate(drift.summary()),
                          one.graph: precision, other: partner_precision}
                if not deploy["gate"].passed:
                    one.held_back = (f"passes beside the FP32 ONNX {other}, but beside the "
                                     f"{partner_precision} {other} engine the pair drifts beyond "
                                     f"the gate ({'; '.join(deploy['gate'].reasons)})")
                    partners, deploy = [], {}
        kept = [c for c in candidates if c.kept]
        for c in candidates:
            if not c.kept:
                rejected.append(c)
                for file in c.files:
                    Path(file).unlink(missing_ok=True)
        for c in partners if kept else ():
            writer.add_artifact(c.graph, ENGINE, "fp32", c.files, **c.meta, validation={
                "tensorrt": _entry(c.drift, None, measured, reference,
                                   {c.graph: "fp32 engine", "partner": ALONE})})
        for c in kept:
            artifact = writer.add_artifact(c.graph, ENGINE, precision, c.files, **c.meta,
                                           validation={"tensorrt": _entry(
                                               c.drift, c.gate, measured, reference,
                                               {c.graph: f"{precision} engine", "partner": ALONE})})
            if deploy:
                artifact["validation_combined"] = _entry(
                    deploy["drift"], deploy["gate"], measured, reference,
                    {g: f"{deploy[g]} engine" for g in GRAPHS})
        added += kept + (partners if kept else [])
        fields = {k: copy.deepcopy(bundle.manifest[k]) for k in MANIFEST_KEEP
                  if k in bundle.manifest}
        fields["builds"] = copy.deepcopy(bundle.manifest.get("builds", []))
        fields["builds"].append({
            "backend": "tensorrt", "precision": precision, "graphs": list(graphs),
            "reference": reference,
            "added": [c.label() for c in kept + (partners if kept else [])],
            "rejected": [{"variant": c.label(), "why": c.why_out()} for c in rejected
                         if c.fmt == ENGINE],
            "seconds": round(time.perf_counter() - started, 1),
        })
        manifest = writer.commit(fields)
    together = deploy and deploy["encoder"] == deploy["decoder"] == precision
    result = BuildResult(bundle_path, manifest, added, rejected,
                         {"drift": deploy["drift"], "gate": deploy["gate"]} if together else {},
                         {"engines": time.perf_counter() - started})
    if report:
        from samedge.validation.report import write_report

        result.report = write_report(bundle_path / "report", manifest).folder
    return result
