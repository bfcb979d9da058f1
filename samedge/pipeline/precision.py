"""The pipeline's precision step: gate FP16, add INT8 where it passes, pick the default variant.

Budgets and the speed margin are stated in docs/performance.md; the default is FP32 unless a
reduced precision is clearly faster.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from samedge.data.items import Item, centre
from samedge.data.slices import Slice
from samedge.export.bundle import BundleWriter, write_manifest
from samedge.pipeline.timing import interleaved
from samedge.progress import Steps
from samedge.quantize.build import build_variants
from samedge.quantize.calibset import CalibrationSet
from samedge.quantize.candidates import MANIFEST_KEEP, BuildResult, SearchOptions
from samedge.runtime.bundle import Bundle
from samedge.runtime.cpu import int8_instructions
from samedge.runtime.predictor import Predictor
from samedge.validation.drift import VariantDrift
from samedge.validation.gate import GateResult, GateSet
from samedge.validation.validate import GRAPHS, variant_label

# -- pipeline -------------------------------------------------------------------------------------
# `samedge pipeline`'s INT8 budget: 16 calibration slices, whole blocks as search units ranked on
# 1 slice, 4 tuning slices, at most 8 real evaluations per graph (its cost on LiteMedSAM is in
# docs/performance.md). `samedge build` defaults to per-op
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


def first_interaction(predictor: Predictor, item: Item) -> tuple[Callable, Callable]:
    """(encode, decode) of a first interaction with ``item``: ``set_image`` (``set_volume`` of a
    stack for depth models), then one box on it (prompt families) or one ``segment()`` call."""
    from samedge.data.prompts import auto_boxes

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
    samples = interleaved(calls, repeats)
    for row, (encoder, decoder) in zip(rows, samples):
        row.encoder_s, row.decoder_s = float(np.median(encoder)), float(np.median(decoder))


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
