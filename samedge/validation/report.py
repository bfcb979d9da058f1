"""The drift report: HTML (self-contained, base64 PNGs) and Markdown (PNG files beside it).

Every number comes from the manifest (or, for ``validate``, from the validation run that the
report file records in ``validation.json``): the tables and plots are drawn from the same
``validation`` entries that sit next to each engine file, so the report cannot disagree with what a
bedside device reads. Worst cases are shown as overlays of the FP32 mask and the variant's mask on
the slice; where the accuracy search ran, the ops that hold INT8 back are listed and plotted by
their share of the embedding error. The folder is staged and swapped into place in one rename.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FIGURES = "figures"


@dataclass
class ReportFiles:
    folder: Path
    html: Path
    markdown: Path
    figures: list[Path]


@dataclass
class WorstCase:
    """One prompt's masks for an overlay: FP32 (reference) vs the variant."""

    variant: str
    slice: str
    prompt: str
    dice: float
    image: np.ndarray
    reference: np.ndarray
    variant_mask: np.ndarray
    box: np.ndarray | None = None


def _variants(manifest: dict, extras: dict) -> list[tuple[str, dict]]:
    """(label, validation entry) for every measured variant, manifest order."""
    rows = []
    run = (extras or {}).get("validation_run")
    if run:
        return [(label, entry) for label, entry in run["variants"].items()]
    for artifact in manifest.get("artifacts", []):
        for backend, entry in (artifact.get("validation") or {}).items():
            label = f"{artifact['graph']} {artifact['format']} {artifact['precision']} ({backend})"
            rows.append((label, entry))
        if artifact.get("validation_combined"):
            label = f"encoder+decoder {artifact['format']} {artifact['precision']}"
            if label not in [r[0] for r in rows]:
                rows.append((label, artifact["validation_combined"]))
    return rows


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _dice_figure(variants: list[tuple[str, dict]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, e in variants if e.get("per_prompt")]
    data = [[p["dice"] for p in e["per_prompt"]] for _, e in variants if e.get("per_prompt")]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(data) + 2), 4.2))
    ax.boxplot(data, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.7)
        ax.scatter([i], [np.mean(values)], marker="D", color="black", s=30, zorder=5)
    for label, entry in variants:
        gate = entry.get("gate")
        if gate:
            ax.axhline(gate["min_worst_dice"], color="tab:red", ls="--", lw=0.8)
            break
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels([l.replace(" (", "\n(") for l in labels], fontsize=8, rotation=0)
    ax.set_ylabel("Dice vs FP32 PyTorch (per prompt)")
    low = min(min(v) for v in data)
    ax.set_ylim(max(0.0, min(low - 0.02, 0.88)), 1.005)
    ax.set_title("Per-prompt Dice vs FP32 (◆ mean; dashed: worst-case gate)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _overlay(image: np.ndarray, reference: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """FP32-only pixels green, variant-only red, agreement yellow, on the grey slice."""
    out = image.astype(np.float32).copy()
    both = reference & variant
    only_ref, only_var = reference & ~variant, variant & ~reference
    for mask, colour in ((both, (255, 220, 0)), (only_ref, (0, 200, 0)), (only_var, (230, 0, 0))):
        out[mask] = 0.5 * out[mask] + 0.5 * np.float32(colour)
    return np.clip(out, 0, 255).astype(np.uint8)


def _worst_figure(cases: Sequence[WorstCase], unit: str = "prompts"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not cases:
        return None
    cols = min(4, len(cases))
    rows = int(np.ceil(len(cases) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, case in zip(axes.ravel(), cases):
        ax.imshow(_overlay(case.image, case.reference.astype(bool),
                           case.variant_mask.astype(bool)))
        if case.box is not None:
            x0, y0, x1, y1 = case.box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="cyan", lw=1))
        ax.set_title(f"{case.variant}\n{case.slice} {case.prompt}: Dice {case.dice:.4f}",
                     fontsize=7)
    fig.suptitle(f"Worst {unit} — yellow: both, green: FP32 only, red: variant only",
                 fontsize=9)
    fig.tight_layout()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _sensitivity_figure(label: str, search: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = search.get("most_sensitive") or []
    if not ops:
        return None
    floated = set(search.get("float_units", []))
    names = [o["op"] for o in ops][::-1]
    values = [np.sqrt(o["rel_err_sq"]) for o in ops][::-1]
    colours = ["tab:blue" if n in floated else "tab:orange" for n in names]
    fig, ax = plt.subplots(figsize=(8.5, 0.22 * len(names) + 1.2))
    ax.barh(range(len(names)), values, color=colours)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([_short(n) for n in names], fontsize=6)
    ax.set_xlabel("relative output error with only this op in INT8")
    ax.set_title(f"{label}: INT8 error per op (blue: kept in float by the search)", fontsize=9)
    fig.tight_layout()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _layer_figure(layer_errors: dict[str, list[dict]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not layer_errors:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    for label, rows in layer_errors.items():
        ax.plot(range(len(rows)), [max(r["rel_err"], 1e-7) for r in rows], label=label, lw=1)
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("relative error vs FP32")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Error of each layer's output, variant vs FP32 (same input)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _short(name: str) -> str:
    return name.replace("/WithoutBiases", "").replace("_output_0", "").lstrip("/")


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float) and np.isnan(value):
        return "—"  # not measured for this family (e.g. IoU of semantic label maps)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> tuple[str, str]:
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return "\n".join(md), f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def summary_rows(variants: list[tuple[str, dict]]) -> list[list[str]]:
    rows = []
    for label, e in variants:
        gate = e.get("gate")
        verdict = "—" if gate is None else ("pass" if gate["passed"] else
                                            "FAIL: " + "; ".join(gate["reasons"]))
        rows.append([label, str(e.get("prompts", "")), _fmt(e.get("dice_mean", float("nan"))),
                     _fmt(e.get("dice_min", float("nan"))), _fmt(e.get("iou_mean", float("nan"))),
                     _fmt(e.get("embedding_cosine_min", float("nan"))),
                     _fmt(e.get("logits_max_abs", float("nan")), 3), verdict])
    return rows


def write_report(folder: str | Path, manifest: dict, extras: dict | None = None,
                 worst_cases: Sequence[WorstCase] = (),
                 layer_errors: dict[str, list[dict]] | None = None) -> ReportFiles:
    """Write ``report.html`` (self-contained) and ``report.md`` + ``figures/`` atomically."""
    extras = extras or {}
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / FIGURES).mkdir(parents=True)
    variants = _variants(manifest, extras)
    figures: list[tuple[str, str, bytes]] = []  # (file, caption, png)

    model = manifest.get("model", {})
    semantic = model.get("decoder") == "semantic"
    # semantic families: a (slice, class) region of the label map takes a prompt's place
    unit, compared = (("regions", "label maps, region by region (one slice, one class)") if semantic
                      else ("prompts", "masks"))
    png = _dice_figure(variants)
    if png:
        figures.append(("dice_per_prompt.png", f"Per-{unit[:-1]} Dice vs FP32, per variant", png))
    png = _worst_figure(list(worst_cases), unit)
    if png:
        figures.append(("worst_cases.png", f"Worst {unit}: FP32 vs variant masks", png))
    for i, (label, search) in enumerate((extras.get("search") or {}).items()):
        png = _sensitivity_figure(label, search)
        if png:
            figures.append((f"int8_error_per_op_{i}.png", f"{label}: INT8 error per op", png))
    png = _layer_figure(layer_errors or {})
    if png:
        figures.append(("layer_errors.png", "Per-layer error vs FP32", png))

    title = f"samedge drift report — {model.get('family', '?')} ({model.get('variant', '?')})"
    headers = ["variant", unit, "Dice mean", "Dice worst", "IoU mean", "emb. cosine min",
               "max abs Δ logit", "gate"]
    md_table, html_table = _table(headers, summary_rows(variants))
    md = [f"# {title}", "",
          "Every variant is run through the samedge runtime and compared with the FP32 PyTorch "
          f"model's own {compared} (Dice 1.0 = identical masks). Figures below are drawn from the same "
          "entries that the manifest stores next to each engine file.", "", md_table, ""]
    body = [f"<h1>{html.escape(title)}</h1>",
            "<p>Every variant is run through the samedge runtime and compared with the FP32 "
            f"PyTorch model's own {html.escape(compared)} (Dice 1.0 = identical masks). Figures are drawn from the "
            "same entries that the manifest stores next to each engine file.</p>", html_table]

    rejected = []
    for build in manifest.get("builds", []):
        for item in build.get("rejected", []):
            why = item["why"] if isinstance(item["why"], str) else "; ".join(item["why"])
            rejected.append([item["variant"], why])
    if rejected:
        m, h = _table(["kept out of the bundle", "why"], rejected)
        md += ["## Variants kept out", "", m, ""]
        body += ["<h2>Variants kept out</h2>", h]
    for label, search in (extras.get("search") or {}).items():
        ops = search.get("most_sensitive", [])
        floated = search.get("float_units", [])
        text = (f"{label}: {search.get('int8_units')} of {search.get('units')} quantized units "
                "(an op, or the ops reading one input quantizer) stay INT8, "
                f"{len(floated)} kept in float by the accuracy search "
                f"({'target met' if search.get('passed') else 'target NOT met'}).")
        if ops:
            text += (" Layers holding INT8 back (largest error with only that unit in INT8): "
                     + ", ".join(f"{_short(o['op'])} ({100 * o['share']:.0f} %)"
                                 for o in ops[:5]) + ".")
        rows = [[_short(o["op"]), f"{np.sqrt(o['rel_err_sq']):.4f}", f"{100 * o['share']:.1f} %",
                 "float" if o["op"] in floated else "int8"] for o in ops[:15]]
        m, h = _table(["op", "rel. error alone in INT8", "share of error", "kept"], rows)
        steps = [[str(s["float_units"]), f"{s['dice_mean']:.4f}", f"{s['dice_min']:.4f}",
                  "pass" if s["passed"] else "fail"] for s in search.get("steps", [])]
        sm, sh = _table(["units in float", "Dice mean", "Dice worst", "target"], steps)
        md += [f"## Accuracy search: {label}", "", text, "", m, "", sm, ""]
        body += [f"<h2>Accuracy search: {html.escape(label)}</h2><p>{html.escape(text)}</p>", h,
                 sh]
    run = extras.get("validation_run")
    if run:
        verdict = "PASS" if run["passed"] else "FAIL"
        md += [f"## Validation run: {verdict}", "", f"data: {run['data']}; prompts: "
               f"{run['prompts']}", ""]
        body += [f"<h2>Validation run: {verdict}</h2><p>data: {html.escape(str(run['data']))}; "
                 f"prompts: {html.escape(str(run['prompts']))}</p>"]

    for file, caption, png in figures:
        (staging / FIGURES / file).write_bytes(png)
        md += [f"### {caption}", "", f"![{caption}]({FIGURES}/{file})", ""]
        data = base64.b64encode(png).decode("ascii")
        body += [f"<h3>{html.escape(caption)}</h3>",
                 f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">']
    numbers = {label: {k: e.get(k) for k in ("prompts", "dice_mean", "dice_min", "iou_mean",
                                             "embedding_cosine_min", "logits_max_abs")}
               for label, e in variants}
    body.append('<script type="application/json" id="samedge-figures">'
                + html.escape(json.dumps(numbers)) + "</script>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
             "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    document = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")
    (staging / REPORT_HTML).write_text(document, encoding="utf-8")
    (staging / REPORT_MD).write_text("\n".join(md) + "\n", encoding="utf-8")
    if run:
        (staging / "validation.json").write_text(json.dumps(run, indent=1) + "\n")
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
    return ReportFiles(folder, folder / REPORT_HTML, folder / REPORT_MD,
                       [folder / FIGURES / f for f, _, _ in figures])
