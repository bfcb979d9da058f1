"""The pipeline's precision step: gate FP16, add INT8 (and BF16 where the CPU computes it) where
they pass with a margin, pick the default variant by a speed advantage that holds.

Budgets are stated in docs/performance.md. A variant stays in the bundle only when it passes its
gate with half the allowance in reserve on the pipeline's validation slices (``with_margin``),
and the default is the most precise variant no other variant is clearly faster than
(``selection``), with the per-round evidence and the CPU recorded in the manifest.
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
from samedge.progress import Steps
from samedge.quantize.build import build_variants
from samedge.quantize.calibset import CalibrationSet
from samedge.quantize.candidates import MANIFEST_KEEP, BuildResult, SearchOptions
from samedge.runtime.bundle import Bundle
from samedge.runtime.cpu import bf16_instructions, cpu_facts, int8_instructions
from samedge.runtime.predictor import Predictor
from samedge.runtime.variants import speed_needs
from samedge.speed.selection import SelectionRule, select
from samedge.speed.timing import interleaved
from samedge.validation.drift import VariantDrift
from samedge.validation.gate import GateResult, GateSet, with_margin
from samedge.validation.validate import GRAPHS, variant_label

# -- pipeline -------------------------------------------------------------------------------------
# `samedge pipeline`'s INT8 budget: 16 calibration slices, whole blocks as search units ranked on
# 1 slice, 4 tuning slices, at most 8 real evaluations per graph (its cost on LiteMedSAM is in
# docs/performance.md). `samedge build` defaults to per-op
# units, 2 ranking slices, 8 tuning slices and the calibration set recorded by `calibrate`.
PIPELINE_CALIBRATION = 16


# Precisions from the most to the least precise: the default walks this order (``selection``).
PRECISION_RANK = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3, "int8-bf16": 4}


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
    margin: GateResult | None = None  # the gate with half its allowance in reserve

    @property
    def label(self) -> str:
        return variant_label(self.backend, self.encoder, self.decoder)

    @property
    def precision(self) -> str:
        """The reduced precision of the pair (its gate's), FP32 for the reference."""
        return self.encoder if self.encoder != "fp32" else self.decoder

    @property
    def passed(self) -> bool:
        return self.gate is not None and self.gate.passed

    @property
    def reduced(self) -> list[tuple[str, str]]:
        """(graph, precision) of the parts that are not FP32: the artifacts the row needs."""
        return [(g, p) for g, p in (("encoder", self.encoder), ("decoder", self.decoder))
                if p != "fp32"]

    @property
    def rank(self) -> tuple[int, str]:
        return (PRECISION_RANK.get(self.encoder, 9) + PRECISION_RANK.get(self.decoder, 9),
                self.label)


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
                  threads: int | None, rule: SelectionRule | None = None,
                  clock: Callable[[], float] = time.perf_counter):
    """Time a first interaction (encoder call + one box, or one ``segment()``) per row in rounds
    interleaved across rows (the cores are shared, so the variants see the same load) until the
    selection rule is clear; rows get their median encoder and decoder times. Returns the
    :class:`Selection` and the per-round times per row label."""
    calls = [first_interaction(Predictor(bundle, backend=r.backend, precision=r.encoder,
                                         threads=threads, decoder_precision=r.decoder), item)
             for r in rows]
    rounds: dict[str, dict[str, list[float]]] = {
        r.label: {"encoder_s": [], "decoder_s": []} for r in rows}

    def time_rounds(count: int, first: bool) -> dict[str, list[float]]:
        samples = interleaved(calls, count, warmup=1 if first else 0, clock=clock)
        costs = {}
        for row, (encoder, decoder) in zip(rows, samples):
            rounds[row.label]["encoder_s"] += encoder
            rounds[row.label]["decoder_s"] += decoder
            costs[row.label] = [e + d for e, d in zip(encoder, decoder)]
        return costs

    selection = select(time_rounds, [r.label for r in rows], rule or SelectionRule())
    for row in rows:
        row.encoder_s = float(np.median(rounds[row.label]["encoder_s"]))
        row.decoder_s = float(np.median(rounds[row.label]["decoder_s"]))
    return selection, rounds


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


def keep_within_margins(bundle_path: Path, rows: Sequence[VariantRow], gates: GateSet,
                        messages: list[str]) -> None:
    """Take out of the bundle every reduced-precision row that fails its gate, or passes it with
    less than half its allowance left (tuned to the edge on a few slices, it fails new ones).
    A failing pair of graphs that each pass alone loses the one that drifts more."""
    drops: dict[tuple[str, str, str], str] = {}
    for row in rows:
        if not row.in_bundle or not row.reduced or row.summary is None:
            continue  # (a pair whose graph just left is out too, and needs no verdict)
        if row.gate is None:
            row.gate = gates.evaluate(row.precision, row.summary)
        row.margin = with_margin(gates.for_precision(row.precision)).evaluate(row.summary)
        if row.passed and row.margin.passed:
            continue
        why = "; ".join(row.gate.reasons) if not row.passed else (
            "passes its gate but not with half its allowance in reserve ("
            + "; ".join(row.margin.reasons) + "): it would not hold on new data")
        parts = row.reduced
        if len(parts) == 2 and row.precision != "fp16":  # FP16 IR: both graphs go together
            # a pair built from two single-graph variants: drop the one that drifts more
            singles = [r for r in rows if len(r.reduced) == 1 and r.reduced[0] in parts
                       and r.in_bundle and r.summary is not None]
            if singles:
                worse = min(singles, key=lambda r: (r.summary["dice_mean"], r.summary["dice_min"]))
                parts = worse.reduced
                why = f"with the other graph's {row.precision} the pair fails: {why}"
        for graph, precision in parts:
            drops[(graph, "openvino_ir", precision)] = why
        messages.append(f"{row.label} kept out of the bundle: {why}")
        for other in rows:  # at once: a later pair must not drop a second graph for this one
            if any((g, "openvino_ir", p) in drops for g, p in other.reduced):
                other.in_bundle = False
    if drops:
        drop_variants(bundle_path, list(drops), {" ".join(k): [v] for k, v in drops.items()})


def _build_rows(result: BuildResult, precision: str, messages: list[str]) -> list[VariantRow]:
    """One row per built graph (the other FP32) and one for the pair, with what the search did."""
    rows = []
    for candidate in result.added + result.rejected:
        encoder = precision if candidate.graph == "encoder" else "fp32"
        decoder = precision if candidate.graph == "decoder" else "fp32"
        row = VariantRow("openvino", encoder, decoder,
                         candidate.drift.summary() if candidate.drift else None, candidate.gate,
                         in_bundle=any(candidate is c for c in result.added))
        rows.append(row)
        facts = ""
        if candidate.search is not None:
            s = candidate.search
            kept = "in float" if precision == "int8" else "in FP32"
            facts = (f"; the accuracy search kept {len(s.float_units)} of "
                     f"{len(s.float_units) + len(s.int8_units)} units {kept}")
        if row.in_bundle:
            messages.append(f"{precision.upper()} {candidate.graph} built: mean Dice "
                            f"{row.summary['dice_mean']:.4f}, worst {row.summary['dice_min']:.4f} "
                            f"vs FP32 PyTorch{facts}")
        else:
            holding = ""
            if candidate.search is not None:
                top = candidate.search.describe(3)["most_sensitive"]
                holding = "; most sensitive: " + ", ".join(
                    f"{o['op']} ({100 * o['share']:.0f} %)" for o in top)
            messages.append(f"{precision.upper()} {candidate.graph} kept out of the bundle: "
                            f"{candidate.why_out()}{facts}{holding}")
    if result.combined:
        rows.append(VariantRow("openvino", precision, precision,
                               result.combined["drift"].summary(), result.combined["gate"],
                               in_bundle=result.combined["gate"].passed))
    return rows


def bf16_capable() -> str | None:
    """None when this CPU computes BF16 natively (and OpenVINO says so), else why not."""
    from samedge.errors import PrecisionUnsupportedError
    from samedge.quantize.bf16 import require_bf16

    try:
        require_bf16()
    except PrecisionUnsupportedError as exc:
        return exc.args[0]
    return None


def quantize_for_pipeline(bundle_path: str | Path, card, slices: Sequence[Item],
                          threads: int | None = None, steps: Steps | None = None,
                          calibration: CalibrationSet | None = None,
                          search: SearchOptions | None = None,
                          measured: dict[tuple[str, str], VariantDrift] | None = None,
                          int8: bool = True, rule: SelectionRule | None = None
                          ) -> PipelineQuantization:
    """What ``samedge pipeline`` does after export: keep the FP16 IR it measured (``measured``:
    the pipeline's drift per (backend, precision)) only if it passes its gate with margin, add
    OpenVINO INT8 encoder and decoder — and BF16 and INT8+BF16 where the CPU computes BF16 — on
    the same terms, then time the survivors in interleaved rounds and record the default
    (``selection``) with its evidence. ``slices``: the validation items (stacks of D adjacent
    slices for depth models), the same the pipeline measured its drift on."""
    steps = steps or Steps(quiet=True)
    rule = rule or SelectionRule()
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
    keep_within_margins(bundle_path, rows, gates, messages)

    result = None
    if int8:
        calibration = calibration or CalibrationSet(None, count=PIPELINE_CALIBRATION)
        result = build_variants(bundle_path, "int8", "openvino", GRAPHS, calibration, slices,
                                card=card, threads=threads, steps=steps,
                                search=search or PIPELINE_SEARCH, layer_errors=False)
        built = _build_rows(result, "int8", messages)
        keep_within_margins(bundle_path, built, gates, messages)
        rows += built
    unable = bf16_capable()
    if unable is None:
        for precision in ("bf16", "int8-bf16"):
            bundle = Bundle(bundle_path)
            source = "int8" if precision == "int8-bf16" else "fp32"
            graphs = [g for g in GRAPHS if any((a["graph"], a["format"], a["precision"]) ==
                                               (g, "openvino_ir", source)
                                               for a in bundle.artifacts)]
            if not graphs:
                continue
            built_result = build_variants(
                bundle_path, precision, "openvino", graphs,
                calibration or CalibrationSet(None, count=PIPELINE_CALIBRATION), slices,
                card=card, threads=threads, steps=steps, search=search or PIPELINE_SEARCH,
                layer_errors=False, report=False)
            built = _build_rows(built_result, precision, messages)
            keep_within_margins(bundle_path, built, gates, messages)
            rows += built
    else:
        messages.append(f"BF16 not built: {unable}")

    bundle = Bundle(bundle_path)
    probe = max(slices, key=lambda s: centre(s).image.shape[0] * centre(s).image.shape[1])
    timed = sorted([r for r in rows if r.in_bundle and (not r.reduced or
                                                        (r.passed and r.margin.passed))],
                   key=lambda r: r.rank)
    if not timed or timed[0].reduced:  # no OpenVINO FP32 measured: it stays the default, untimed
        timed.insert(0, VariantRow("openvino", "fp32", "fp32", None, None))
    selection, rounds = None, {}
    if len(timed) > 1 or timed[0].summary is not None:
        with steps.step(f"time {len(timed)} OpenVINO variants, interleaved rounds "
                        f"({rule.rounds}–{rule.max_rounds})"):
            selection, rounds = time_variants(bundle, timed, probe, threads, rule)
    default = next(r for r in timed if selection is None or r.label == selection.choice)
    default.default = True
    decode = "one segment() call" if card.decoder == "semantic" else "one box"
    reference = timed[0]
    for comparison in selection.comparisons if selection else []:
        messages.append(
            f"{comparison.candidate} vs {comparison.against} (encoder + {decode}), time ratio "
            f"(< 1 = faster): fastest rounds {comparison.best_ratio:.2f}, paired median "
            f"{comparison.paired_ratio:.2f}, "
            f"≥{rule.margin / 2:.0%} faster in {comparison.wins:.0%} of {selection.rounds} "
            f"rounds → {comparison.verdict}")
    faster = selection.faster_than_reference(reference.label, rule) if selection else []
    slow_int8 = [r for r in timed if any("int8" in p for _, p in r.reduced)
                 and r.label not in faster]
    if slow_int8:
        fast = int8_instructions()
        messages.append(
            "INT8 is no faster than FP32 here: this CPU has no INT8 dot-product instructions (no "
            "AVX-512 VNNI, AVX-VNNI or AMX), so OpenVINO computes INT8 layers no faster than FP32"
            if not fast else
            f"INT8 measured no clearer than {rule.margin:.0%} faster than FP32 although this CPU "
            f"has {', '.join(fast)}: the accuracy search keeps most units in float (see above)")
    messages.append(
        f"default variant: {default.label} — "
        + ("no variant is clearly faster than FP32" if default is reference else
           "clearly faster than every more precise variant that passes")
        + (f" ({default.encoder_s * 1e3:.0f} ms encoder + {default.decoder_s * 1e3:.1f} ms "
           f"{decode}, medians)" if default.encoder_s else "")
        + (f"; {selection.rounds} rounds" + (", re-timed because rounds disagreed"
                                             if selection.retimed else "") if selection else ""))
    fallbacks = [r for r in sorted(timed, key=lambda r: r.rank, reverse=True)
                 if r is not default and (r.label in faster or r is reference)]
    manifest = bundle.manifest
    manifest["default_variant"] = {
        "backend": default.backend, "precision": default.encoder,
        "decoder_precision": default.decoder,
        "why": "the most precise variant that no less precise one beats clearly: faster by "
               f"{rule.margin:.0%} in its fastest round, in the median of paired rounds and in "
               f"{rule.agreement:.0%} of rounds (by half that), on the machine that built the "
               "bundle; every variant passed its gate with half its allowance in reserve",
        "needs": speed_needs(default.encoder, default.decoder),
        "fallbacks": [{"backend": r.backend, "precision": r.encoder,
                       "decoder_precision": r.decoder,
                       "needs": speed_needs(r.encoder, r.decoder)} for r in fallbacks],
        "cpu": cpu_facts(),
        "timed": {r.label: {"encoder_s": r.encoder_s, "decoder_s": r.decoder_s} for r in timed
                  if r.encoder_s is not None},
        "per_round": rounds,
        **(selection.evidence(rule) if selection else {}),
        "int8_instructions": int8_instructions(),
        "bf16_instructions": bf16_instructions(),
    }
    write_manifest(bundle_path, manifest)
    seconds = time.perf_counter() - started
    return PipelineQuantization(result, rows, default, messages, seconds, manifest,
                                result.report if result else None)
