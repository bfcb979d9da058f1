"""One function per command: read the arguments, call the library, print, return the exit code.

Heavy modules (torch, the backends) are imported inside each command, so ``samedge info`` and
``samedge predict`` start fast and work on a runtime-only install.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from samedge.cli.tables import (
    build_table,
    console,
    pipeline_table,
    print_bundle,
    print_quantization,
    validation_table,
)
from samedge.errors import PromptError, SamedgeError


# Kept as literals so `samedge info` and `predict` start without importing torch;
# tests/test_cli.py checks they match samedge.models.FAMILIES.
def _model_options(args) -> dict:
    """Only the options the user gave, so each builder keeps its own defaults."""
    return {name: getattr(args, name) for name in args.model_option_names
            if getattr(args, name, None) is not None}


def cmd_pipeline(args, steps) -> int:
    from samedge.export.atomic import check_target
    from samedge.pipeline.run import run_pipeline

    check_target(args.out)  # before torch loads and minutes of work, not after

    result = run_pipeline(args.family, args.out, args.backends.split(","), threads=args.threads,
                          steps=steps, validation_data=args.validation_data or None,
                          int8=not args.no_int8, held_out_data=args.held_out_data or None,
                          **_model_options(args))
    print_bundle(result.manifest, args.out)
    console.print(pipeline_table(result))
    if result.quantization is not None:
        print_quantization(result.quantization)
    held = result.held_out
    if held is None:
        console.print(escape(result.held_out_note))
        return 0
    where = ("held-out real slices no step above read" if not args.held_out_data
             else ", ".join(map(str, args.held_out_data)))
    console.print(validation_table(held, escape(
        f"held-out check: every variant in the bundle vs FP32 PyTorch on {len(held.slices)} "
        f"{where}")))
    console.print(escape(f"held-out report: {held.report / 'report.html'}"))
    if not held.passed:
        Console(stderr=True).print(f"[red]held-out gate failed:[/] {escape(', '.join(held.failed))}"
                                   " passed on the pipeline's slices but not on new ones (exit 1)")
    return held.exit_code


def cmd_export(args, steps) -> int:
    from samedge.data.bundled import bundled_slices
    from samedge.data.items import centre, read_items
    from samedge.export.atomic import check_target
    from samedge.export.exporter import export_bundle
    from samedge.models import build_model
    from samedge.pipeline.run import EXPORT_VALIDATION

    check_target(args.out)  # refuse a foreign folder before the model is built

    with steps.step(f"build {args.family} model"):
        card = build_model(args.family, **_model_options(args))
    stacks = None  # depth models: stacks of D adjacent slices (default: the bundled MR volume)
    if args.validation_data:
        items = read_items(args.validation_data, card.depth)
        slices, stacks = [centre(i) for i in items], items if card.depth > 1 else None
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
    from samedge.data.open import load_image, open_volume, volume_stack

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
    from samedge.runtime.prompts import check_prompts

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
    console.print(escape(f"running {variant}: {predictor.choice.why}"))
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
        classes = result.scores.shape[1]
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


def cmd_doctor(args, steps) -> int:
    from samedge.doctor import doctor

    report = doctor(args.bundle, args.target)
    for line in report.lines():
        console.print(escape(line), soft_wrap=True)
    return report.exit_code


# -- calibrate / build / validate: argument parsing here, logic in samedge.quantize / validation --
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
    """The default gates (``samedge.validation.gate``) with the command line's overrides, for one
    precision or (``None``) for every precision."""
    from samedge.validation.gate import GateSet

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


def cmd_calibrate(args, steps) -> int:
    from samedge.quantize.calibrate import calibrate_bundle

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


def cmd_build(args, steps) -> int:
    from samedge.data.items import read_items
    from samedge.data.prompts import PromptPolicy
    from samedge.data.windows import normalize_window
    from samedge.quantize.build import (
        build_variants,
        calibration_from_manifest,
        check_request,
        require_tensorrt,
    )
    from samedge.quantize.candidates import SearchOptions
    from samedge.runtime.bundle import Bundle

    graphs = _parse_graphs(args.graphs)
    gates = _gates(args, args.precision)
    check_request(args.precision, args.backend)
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
    if args.validation_data:  # depth models: stacks of D adjacent slices of each volume
        validation = read_items(args.validation_data, int(bundle.model.get("depth", 1)),
                                args.count, normalize_window(args.window))
    options = _prompt_options(args.prompts)
    policy = PromptPolicy(mode=options["prompts"], prompts_file=options["prompts_file"],
                          clicks=bundle.model.get("prompt") == "points")
    search = SearchOptions(method=args.search, tune_on=args.tune_on,
                           max_evaluations=args.max_evaluations, speed=args.search_speed)
    with _Notes():
        engine_options = None
        if args.backend == "tensorrt":
            from samedge.export.tensorrt import EngineOptions

            engine_options = EngineOptions(
                max_prompts=args.engine_max_prompts, max_points=args.engine_max_points,
                max_images=args.engine_max_images, workspace_gib=args.engine_workspace_gib,
                version_compatible=args.engine_version_compatible,
                hardware_compatible=args.engine_hardware_compatible)
        result = build_variants(args.bundle, args.precision, args.backend, graphs, calibration,
                                validation, prompts=policy, gates=gates, search=search,
                                ort_calibration=args.calibration_method, threads=args.threads,
                                steps=steps, layer_errors=not args.no_layer_errors,
                                engine_options=engine_options)
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


def cmd_validate(args, steps) -> int:
    from samedge.validation.validate import validate_bundle

    gates = _gates(args, None)
    options = _prompt_options(args.prompts)
    with _Notes():
        result = validate_bundle(args.bundle, args.data, gates=gates, window=args.window,
                                 count=args.count, report_dir=args.report, jitter=args.jitter,
                                 threads=args.threads, steps=steps,
                                 backends=args.backend.split(",") if args.backend else None,
                                 **options)
    data = (f"{len(result.slices)} held-out real slices no pipeline step reads" if not args.data
            else ", ".join(map(str, args.data)))
    console.print(validation_table(result, escape(
        f"samedge validate: every variant vs the FP32 PyTorch model on {data} "
        f"(prompts: {args.prompts})")))
    console.print(escape(f"report: {result.report / 'report.html'} "
                         f"(and {result.report / 'report.md'})"))
    if not result.passed:
        Console(stderr=True).print(f"[red]gate failed:[/] {escape(', '.join(result.failed))} "
                                   "drifted beyond the gate (exit 1)")
    return result.exit_code
