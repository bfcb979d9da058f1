"""The command line's grammar. Family options come from the families' specs, loaded only for the
commands that build a model, so ``samedge predict`` and ``info`` never import torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from samedge.cli.commands import (
    cmd_build,
    cmd_calibrate,
    cmd_export,
    cmd_info,
    cmd_pipeline,
    cmd_predict,
    cmd_validate,
)
from samedge.models.family import Option
from samedge.models.registry import FAMILY_NAMES

MODEL_COMMANDS = frozenset({"pipeline", "export", "calibrate"})
FamilyOptions = Sequence[tuple[Option, Sequence[str]]]


def _add_model_args(parser: argparse.ArgumentParser, options: FamilyOptions) -> None:
    """``--family`` and every option a family's spec declares, each saying which families take
    it; the builder of the chosen family rejects the ones it does not take."""
    parser.add_argument("--family", default="litemedsam", choices=FAMILY_NAMES,
                        help="model family (default litemedsam)")
    for option, families in options:
        parser.add_argument(option.flag, dest=option.name, type=option.type,
                            choices=option.choices, default=None,
                            help=f"{option.help} [{', '.join(families)}]")
    parser.set_defaults(model_option_names=[option.name for option, _ in options])
    parser.add_argument("--backends", default="onnxruntime,openvino",
                        help="comma-separated: onnxruntime, openvino")
    parser.add_argument("-o", "--out", type=Path, default=Path("samedge-bundle"),
                        help="bundle folder to write (default ./samedge-bundle)")


def _add_gate_args(parser: argparse.ArgumentParser, which: str) -> None:
    parser.add_argument("--max-dice-drop", type=float, default=None, metavar="X",
                        help=f"gate: largest allowed mean Dice drop vs FP32 for {which} "
                             "(default int8 0.01, fp16 0.002)")
    parser.add_argument("--min-worst-dice", type=float, default=None, metavar="Y",
                        help=f"gate: smallest allowed single-prompt Dice for {which} "
                             "(default int8 0.90, fp16 0.98)")
    parser.add_argument("--min-embedding-cosine", type=float, default=None, metavar="C",
                        help="gate: smallest allowed image-embedding cosine (default: off)")


def _add_quantization_commands(sub, options: FamilyOptions) -> None:
    p = sub.add_parser("calibrate", help="record the calibration set in a bundle (exports the "
                                         "bundle first when there is none)")
    _add_model_args(p, options)
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
    p.add_argument("--precision", required=True, choices=("int8", "fp16", "bf16", "int8-bf16"),
                   help="bf16 / int8-bf16 (OpenVINO, an INT8 IR's float parts in BF16): built "
                        "only on CPUs with AMX-BF16 or AVX512-BF16, which compute it")
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


def build_parser(options: FamilyOptions = ()) -> argparse.ArgumentParser:
    """The whole grammar; ``options`` are the families' (see :func:`family_options_for`)."""
    parser = argparse.ArgumentParser(prog="samedge", description="Medical SAM adaptations from training checkpoint to validated engines")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="export, convert, check against PyTorch and time")
    _add_model_args(p, options)
    p.add_argument("--validation-data", nargs="*", type=Path, default=(),
                   help="images/DICOM/NIfTI to validate and time on; depth models take volumes "
                        "(DICOM series folder, NIfTI): two stacks of D slices each (default: the "
                        "bundled real slices, or stacks of the bundled MR volume)")
    p.add_argument("--no-int8", action="store_true",
                   help="skip the INT8 calibration and accuracy search (about 3½ of the "
                        "pipeline's minutes on 2 cores); FP16 is still gated")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("export", help="export a model to a bundle (ONNX x2 + OpenVINO IR)")
    _add_model_args(p, options)
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
    p.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    p.set_defaults(func=cmd_info)

    _add_quantization_commands(sub, options)
    return parser


def family_options_for(argv: Sequence[str]) -> FamilyOptions:
    """The families' options, loaded (with torch) only when a command that builds a model may
    be asked for, so that ``predict`` and ``info`` stay torch-free."""
    if not MODEL_COMMANDS & set(argv):
        return ()
    from samedge.models.registry import all_options

    return all_options()
