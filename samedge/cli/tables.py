"""What the commands print: rich tables of bundles, drift, gates and timings."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# A fixed width keeps tables readable when stdout is a pipe or a CI log.
console = Console(width=None if sys.stdout.isatty() else 132)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def print_quantization(quantization) -> None:
    """The pipeline's precision step: one row per OpenVINO variant with its gate result."""
    table = Table(title="OpenVINO variants vs FP32 PyTorch, gated (latency: interleaved rounds on "
                        "the largest slice)")
    semantic = quantization.manifest.get("model", {}).get("decoder") == "semantic"
    for column in ("variant", "Dice mean", "Dice worst", "gate", "½ allowance", "in bundle",
                   "encoder", "decoder / call" if semantic else "decoder / box"):
        table.add_column(column, justify="left" if column in ("variant", "gate") else "right",
                         no_wrap=column == "variant")
    for row in quantization.rows:
        summary = row.summary or {}
        table.add_row(row.label + (" [bold](default)[/]" if row.default else ""),
                      f"{summary['dice_mean']:.4f}" if summary else "—",
                      f"{summary['dice_min']:.4f}" if summary else "—",
                      _verdict(row.gate.to_dict() if row.gate else None)
                      .replace("reference", "—"),
                      "—" if row.margin is None else "pass" if row.margin.passed else "FAIL",
                      "yes" if row.in_bundle else "no",
                      f"{row.encoder_s * 1e3:.0f} ms" if row.encoder_s else "—",
                      f"{row.decoder_s * 1e3:.1f} ms" if row.decoder_s else "—")
    console.print(table)
    for message in quantization.messages:
        console.print(f"• {escape(message)}")
    if quantization.report is not None:
        console.print(escape(f"drift report: {quantization.report / 'report.html'}"))
    console.print(f"precision step: {quantization.seconds:.0f} s")


def pipeline_table(result) -> Table:
    """Drift and latency per variant: prompt families by mask Dice per prompt, semantic families
    (SAMed, MA-SAM) by the share of pixels whose label equals PyTorch's argmax."""
    model, depth = result.manifest["model"], result.depth
    if depth > 1:
        data, unit = f"{result.stacks} real stacks of {depth} adjacent slices", "stack"
    else:
        data, unit = f"{result.slices} real slices", "slice"
    if model["decoder"] == "semantic":
        table = Table(title=f"Runtime vs FP32 PyTorch label maps (argmax) on {data}, no prompt; "
                            f"latency on the largest {unit}")
        columns = ("backend", "precision", f"encoder / {unit}", "decoder / call",
                   "labels = PyTorch", "worst slice", "class Dice min", "max |Δ logit|")
    else:
        prompts = "5 boxes + 5 clicks" if model["prompt"] == "points" else "5 boxes"
        where = " on each stack's centre slice" if depth > 1 else " each"
        table = Table(title=f"Runtime vs FP32 PyTorch on {data} ({prompts}{where}); latency on "
                            f"the largest {unit}")
        columns = (("backend", "precision", f"encoder / {unit}", "decoder / box",
                    "16 boxes / box", "Dice mean", "Dice min", "max |Δ logit|"))
    for column in columns:
        table.add_column(column, justify="right")
    for key, drift in result.drift.items():
        summary, lat = drift.summary(), result.latency[key]
        if model["decoder"] == "semantic":
            cells = (f"{lat.decoder_s * 1e3:.1f} ms ({lat.slices_per_call} sl.)",
                     f"{summary['pixel_agreement_mean'] * 100:.3f} %",
                     f"{summary['pixel_agreement_min'] * 100:.3f} %", f"{summary['dice_min']:.4f}")
        else:
            cells = (f"{lat.box_s * 1e3:.1f} ms", f"{lat.boxes16_per_box_s * 1e3:.1f} ms",
                     f"{summary['dice_mean']:.4f}", f"{summary['dice_min']:.4f}")
        table.add_row(*key, f"{lat.encoder_s * 1e3:.0f} ms", *cells,
                      f"{summary['logits_max_abs']:.2e}")
    return table


def print_bundle(manifest: dict, path: Path) -> None:
    model = manifest["model"]
    console.print(f"[bold]{path}[/]: {model['family']} ({model['variant']}), "
                  f"input {model['image_size']}², embeddings {model['embedding_shape']}")
    table = Table(title="Bundle files")
    for column in ("graph", "format", "precision", "file", "size", "sha256"):
        table.add_column(column)
    for a in manifest["artifacts"]:
        table.add_row(a["graph"], a["format"], a["precision"], a["entry"], _mib(a["bytes"]),
                      next(iter(a["files"].values()))[:12])
    console.print(table)
    errors = Table(title="Export validation: ONNX Runtime vs PyTorch (max |error|)")
    for column in ("graph", "cases", "outputs"):
        errors.add_column(column)
    for name, graph in manifest["graphs"].items():
        measured = graph["measured"]
        errors.add_row(name, str(measured["cases"]), ", ".join(
            f"{k} {v:.1e}" for k, v in measured["max_abs_error"].items()))
    console.print(errors)


def _verdict(gate: dict | None) -> str:
    if gate is None:
        return "reference"
    return "[green]pass[/]" if gate["passed"] else "[red]FAIL[/]: " + escape(
        "; ".join(gate["reasons"]))


def build_table(result) -> Table:
    """One row per candidate graph: calibration, search, drift vs FP32 PyTorch, gate."""
    table = Table(title="samedge build: each candidate measured through the runtime against the "
                        "FP32 PyTorch model")
    for column in ("graph", "format", "precision", "calibration", "kept in float", "Dice mean",
                   "Dice worst", "emb. cos min", "gate"):
        table.add_column(column, justify="right" if column.startswith(("Dice", "emb")) else "left",
                         no_wrap=column in ("graph", "format", "precision"))
    for candidate in result.added + result.rejected:
        quant = candidate.meta.get("quantization", {})
        calibration = (f"{quant['calibration_inputs']} inputs, {quant['calibration_seconds']:.0f} s"
                       if "calibration_inputs" in quant else "—")
        search = candidate.search
        floated = (f"{len(search.float_units)} of "
                   f"{len(search.float_units) + len(search.int8_units)} units"
                   if search is not None else "—")
        summary = candidate.drift.summary() if candidate.drift else {}
        if candidate.error:
            verdict = f"[red]not built[/]: {escape(candidate.error)}"
        elif candidate.held_back:
            verdict = f"[green]pass[/] alone → kept out: {escape(candidate.held_back)}"
        else:
            verdict = _verdict(candidate.gate.to_dict() if candidate.gate else None)
            added = any(candidate is c for c in result.added)
            verdict += " → added" if added else " → kept out"
        table.add_row(candidate.graph, candidate.fmt, candidate.precision, calibration, floated,
                      f"{summary['dice_mean']:.4f}" if summary else "—",
                      f"{summary['dice_min']:.4f}" if summary else "—",
                      f"{summary['embedding_cosine_min']:.5f}" if summary else "—", verdict)
    return table


def validation_table(result, title: str) -> Table:
    table = Table(title=title)
    for column in ("variant", "prompts", "Dice mean", "Dice worst", "worst prompt", "IoU mean",
                   "emb. cos min", "gate"):
        table.add_column(column, justify="right" if column[0].isupper() or column == "prompts"
                         else "left", no_wrap=column == "variant")
    for label, entry in result.variants.items():
        worst = entry.get("worst") or [{}]
        where = f"{worst[0].get('slice', '')} {worst[0].get('prompt', '')}".strip()
        table.add_row(label, str(entry["prompts"]), f"{entry['dice_mean']:.4f}",
                      f"{entry['dice_min']:.4f}", escape(where),
                      f"{entry['iou_mean']:.4f}" if "iou_mean" in entry else "—",
                      f"{entry['embedding_cosine_min']:.5f}", _verdict(entry.get("gate")))
    return table
