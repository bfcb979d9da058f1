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
    cmd_doctor,
    cmd_export,
    cmd_info,
    cmd_pipeline,
    cmd_predict,
    cmd_validate,
)
from samedge.cli.segment import FORMATS, cmd_segment
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

    p = sub.add_parser("build", help="add INT8/FP16/BF16 variants to a bundle; only variants "
                                     "that pass their accuracy gate are kept")
    p.add_argument("bundle", type=Path)
    p.add_argument("--backend", required=True, choices=("openvino", "onnxruntime", "tensorrt"),
                   help="openvino: NNCF INT8 / FP16 / BF16 IR; onnxruntime: Q/DQ INT8 / mixed "
                        "FP16 / mixed BF16 ONNX (the graphs TensorRT consumes; BF16 measured "
                        "through its FP32 stand-in); tensorrt: engines (needs TensorRT)")
    p.add_argument("--precision", required=True, choices=("int8", "fp16", "bf16", "int8-bf16"),
                   help="bf16 on OpenVINO and int8-bf16 (an INT8 IR's float parts in BF16): "
                        "built only on CPUs with AMX-BF16 or AVX512-BF16, which compute it; "
                        "bf16 ONNX/TensorRT (Ampere and later, TensorRT 10+): on any machine")
    p.add_argument("--graphs", default="encoder,decoder", help="encoder, decoder or both")
    p.add_argument("--search", default="search", choices=("search", "nncf", "none"),
                   help="accuracy control for INT8: samedge's search (rank ops by INT8 error, "
                        "bisect on mask Dice), nncf (quantize_with_accuracy_control, OpenVINO) "
                        "or none (plain post-training quantization)")
    p.add_argument("--tune-on", default="calibration", choices=("calibration", "validation"),
                   help="slices the search measures (default: calibration, validation held out)")
    p.add_argument("--max-evaluations", type=int, default=10,
                   help="search budget: real Dice evaluations (default 10)")
    p.add_argument("--search-speed", default="auto", choices=("auto", "on", "off"),
                   help="time the passing INT8/float (BF16/float) splits the search found and "
                        "keep the most precise one no other is clearly faster than (auto: on "
                        "CPUs whose INT8 dot products or BF16 instructions can pay; OpenVINO)")
    p.add_argument("--calibration-method", default="minmax",
                   choices=("minmax", "entropy", "percentile"), help="ONNX Runtime Q/DQ ranges")
    p.add_argument("--validation-data", nargs="+", type=Path, default=None, metavar="PATH",
                   help="slices the gate is measured on (default: the bundled real slices)")
    p.add_argument("--window", default=None, help="CT window of --validation-data")
    p.add_argument("--count", type=int, default=100, help="validation slices at most")
    p.add_argument("--prompts", default="auto", metavar="auto|boxes-from-masks|FILE")
    p.add_argument("--no-layer-errors", action="store_true",
                   help="skip the per-layer error localisation in the report")
    engine = p.add_argument_group("TensorRT engines (--backend tensorrt)")
    engine.add_argument("--engine-max-prompts", type=int, default=16, metavar="B",
                        help="largest prompt batch per decoder call in the optimisation profile; "
                             "the runtime splits larger batches (default 16)")
    engine.add_argument("--engine-max-points", type=int, default=16, metavar="N",
                        help="most points per prompt (a box is 2; default 16)")
    engine.add_argument("--engine-max-images", type=int, default=16, metavar="K",
                        help="semantic decoders: most slices per call (default 16, at least the "
                             "model's depth); the runtime splits larger stacks")
    engine.add_argument("--engine-workspace-gib", type=float, default=2.0, metavar="GIB",
                        help="builder workspace limit (default 2; 1 on an 8 GB Orin Nano)")
    engine.add_argument("--engine-version-compatible", action="store_true",
                        help="engines that later TensorRT versions also run (slower)")
    engine.add_argument("--engine-hardware-compatible", action="store_true",
                        help="engines for any Ampere-or-later discrete GPU (slower; not Jetson)")
    _add_gate_args(p, "the built precision")
    p.set_defaults(func=cmd_build, strict_exit=True)

    p = sub.add_parser("validate", help="re-measure every variant of a bundle against FP32 "
                                        "PyTorch; exit 1 when a gate fails")
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", nargs="+", type=Path, default=None, metavar="PATH",
                   help="held-out slices (default: bundled real MR slices that no step of "
                        "`samedge pipeline` reads: a TOF angiography MIP and EPI/anatomical "
                        "slices between the pipeline's)")
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
    p.add_argument("--backend", default=None, metavar="onnxruntime,openvino,tensorrt",
                   help="measure only these backends' variants (default: ONNX Runtime and "
                        "OpenVINO, and TensorRT where it is installed)")
    _add_gate_args(p, "every reduced-precision variant")
    p.set_defaults(func=cmd_validate, strict_exit=True)


def _add_segment_command(sub) -> None:
    p = sub.add_parser("segment", help="segment a volume; the output has the input's exact "
                                       "grid (NIfTI) or references its series (DICOM-SEG)")
    p.add_argument("bundle", type=Path)
    p.add_argument("volume", type=Path, help="DICOM series folder or NIfTI file")
    p.add_argument("--box3d", default=None, metavar="x0,y0,z0,x1,y1,z1",
                   help="voxel indices, inclusive (NIfTI: i, j, k in stored order; DICOM: "
                        "column, row, slice sorted along the normal); propagated from the "
                        "middle slice outward")
    p.add_argument("--point", action="append", default=[], metavar="x,y,z[,label]",
                   help="voxel indices on one slice (repeatable); propagated outward")
    p.add_argument("-o", "--out", type=Path, required=True,
                   help="output: .nii/.nii.gz, or .dcm for a DICOM-SEG")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="nifti or dicom-seg (default: from the output's suffix)")
    p.add_argument("--window", default=None,
                   help="CT window: abdomen, lung, bone, brain or L,W (default: the model's own "
                        "CT window where its bundle records one, else abdomen)")
    p.add_argument("--modality", default=None, help="modality of NIfTI files (default MR; CT "
                                                    "windows it in HU)")
    p.add_argument("--backend", default=None, help="onnxruntime or openvino (default: the "
                                                   "bundle's default variant)")
    p.add_argument("--precision", default=None, help="fp32, fp16 or int8")
    p.add_argument("--refine", action="store_true",
                   help="feed each slice the previous slice's low-res logits as mask_input")
    p.add_argument("--cache-mb", type=int, default=1024,
                   help="embedding cache budget (default 1024 MiB); least recently used first")
    p.set_defaults(func=cmd_segment)


def build_parser(options: FamilyOptions = ()) -> argparse.ArgumentParser:
    """The whole grammar; ``options`` are the families' (see :func:`family_options_for`)."""
    parser = argparse.ArgumentParser(prog="samedge", description="Medical SAM adaptations from training checkpoint to validated engines")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads, 1 to the cores available (default: all)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="export, convert, check against PyTorch and time")
    _add_model_args(p, options)
    p.add_argument("--validation-data", nargs="*", type=Path, default=(),
                   help="images/DICOM/NIfTI to validate and time on; depth models take volumes "
                        "(DICOM series folder, NIfTI): two stacks of D slices each (default: the "
                        "bundled real slices, or stacks of the bundled MR volume)")
    p.add_argument("--held-out-data", nargs="*", type=Path, default=(),
                   help="slices (volumes for depth models) of other patients, read by no other "
                        "step, on which every variant left in the bundle is gated last (default: "
                        "with the default validation data, bundled real MR slices no step reads; "
                        "exit 1 when a gate fails there)")
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
    p.add_argument("--frame", type=int, default=None,
                   help="volume of a 4-D NIfTI (required when it holds several)")
    p.add_argument("--backend", default=None,
                   help="onnxruntime, openvino or tensorrt (default: the bundle's default "
                        "variant, recorded by `samedge pipeline`, else the first installed)")
    p.add_argument("--precision", default=None,
                   help="fp32, fp16 or int8 (default: the bundle's default variant, else fp32)")
    p.add_argument("-o", "--out", type=Path, default=Path("mask"),
                   help="output prefix: writes PREFIX.png (mask, or the class index per "
                        "pixel for semantic models) and PREFIX_overlay.png")
    p.set_defaults(func=cmd_predict)

    _add_segment_command(sub)

    p = sub.add_parser("info", help="describe a bundle and verify its files")
    p.add_argument("bundle", type=Path)
    p.add_argument("--no-verify", action="store_true",
                   help="skip the files' sha256 (the manifest is always verified)")
    p.add_argument("--upgrade", action="store_true",
                   help="seal a format 1 bundle's manifest as it is now, after checking every "
                        "file (only for a copy you trust)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("doctor", help="what a TensorRT version can parse of a bundle, and what "
                                      "this machine can run (no TensorRT needed)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--target", default=None, metavar="tensorrt-X.Y",
                   help="check the graphs against this TensorRT version's ONNX parser (default: "
                        "the installed TensorRT, if any)")
    p.set_defaults(func=cmd_doctor)

    _add_quantization_commands(sub, options)
    return parser


def family_options_for(argv: Sequence[str]) -> FamilyOptions:
    """The families' options, loaded (with torch) only when a command that builds a model may
    be asked for, so that ``predict`` and ``info`` stay torch-free."""
    if not MODEL_COMMANDS & set(argv):
        return ()
    from samedge.models.registry import all_options

    return all_options()
