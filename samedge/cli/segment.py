"""``samedge segment``: a CT/MR volume in, a segmentation volume out on the input's exact grid.

The data side reads the volume and its geometry, the runtime's VolumePredictor segments the
slices, the writers put the answer back on the file's voxels (NIfTI) or reference the source
series (DICOM-SEG). Coordinates on the command line are voxel indices (``data.geometry``).
"""

from __future__ import annotations

from rich.markup import escape

from samedge.cli.commands import _Notes, _parse_numbers
from samedge.cli.tables import console
from samedge.errors import DataSourceError, PromptError

FORMATS = ("nifti", "dicom-seg")


def _output_format(args) -> str:
    from samedge.data.writers import nifti_suffix

    fmt = args.format or ("dicom-seg" if args.out.suffix.lower() == ".dcm" else "nifti")
    if fmt == "nifti":
        nifti_suffix(args.out)  # a wrong name fails before any encoding
    return fmt


def _open(args, predictor):
    """The volume, CT windowed as ``predict`` does: ``--window``, else the family's training
    window where the bundle records one, else the reader's default (abdomen)."""
    from samedge.data.open import open_volume

    volume = open_volume(args.volume, args.window, args.modality)
    family_window = predictor.pre.ct_window
    if args.window is None and family_window is not None and volume.modality.upper() == "CT":
        level, width = family_window
        volume = open_volume(args.volume, family_window, args.modality)
        console.print(escape(f"CT windowed to [{level - width / 2:g}, {level + width / 2:g}] HU, "
                             "the model's training window (override with --window)"))
    return volume


def _prompts(args, predictor) -> tuple[list[float] | None, list[list[float]]]:
    family = predictor.bundle.model.get("family", "this model")
    box = _parse_numbers(args.box3d, (6,), "3-D box") if args.box3d else None
    points = [_parse_numbers(p, (3, 4), "point") for p in args.point]
    if predictor.semantic and (box or points):
        raise PromptError(f"{family} is prompt-free: it labels every class without a prompt",
                          hint="drop --box3d and --point; segment writes the label volume")
    if not predictor.semantic and not (box or points):
        raise PromptError(f"empty prompt: {family} segments what a prompt points at",
                          hint="give --box3d x0,y0,z0,x1,y1,z1 or --point x,y,z[,label]")
    if box and points:
        raise PromptError("give either --box3d or --point, not both",
                          hint="one prompt kind per run; run segment again for another")
    return box, points


def cmd_segment(args, steps) -> int:
    import numpy as np

    from samedge import __version__
    from samedge.data.writers import write_dicom_seg, write_nifti
    from samedge.runtime import Predictor, VolumePredictor

    fmt = _output_format(args)
    predictor = Predictor(args.bundle, backend=args.backend, precision=args.precision,
                          threads=args.threads)
    console.print(escape(f"running {predictor.backend} {predictor.precision}"))
    box, points = _prompts(args, predictor)
    volume = _open(args, predictor)
    geometry = volume.geometry  # irregular spacing, mixed orientation: refused before encoding
    if fmt == "dicom-seg" and geometry.kind != "dicom":
        raise DataSourceError("--format dicom-seg references a source DICOM series; "
                              f"{volume.name} is NIfTI", hint="write NIfTI (-o seg.nii.gz)")
    segmenter = VolumePredictor(predictor, cache_bytes=args.cache_mb << 20, refine=args.refine)
    segmenter.set_volume(volume.images())
    count = len(volume)
    family = str(predictor.bundle.model.get("family", "samedge"))
    with _Notes():
        if box is not None:
            x0, y0, n0, x1, y1, n1 = geometry.slice_box(box)
            with steps.counter(f"box through slices {n0}..{n1}", n1 - n0 + 1) as advance:
                result = segmenter.predict_box((x0, y0, n0, x1, y1, n1), progress=advance)
        elif points:
            placed = [geometry.slice_point(p[:3]) for p in points]
            with steps.counter("point, outward until the mask vanishes", count) as advance:
                result = segmenter.predict_point(placed, [p[3] if len(p) == 4 else 1
                                                          for p in points], progress=advance)
        else:
            with steps.counter(f"label {count} slices", count) as advance:
                labelled = segmenter.segment(progress=advance)
    if box is not None or points:
        labels, names = result.mask.astype(np.uint8), ["segment"]
        decoded = result.decoded
        summary = (f"{int(result.mask.sum())} voxels on {int(result.mask.any(axis=(1, 2)).sum())} "
                   f"of {count} slices ({decoded.size} decoded"
                   + (f", {decoded.min()}..{decoded.max()}" if decoded.size else "") + ")")
    else:
        labels = labelled.labels
        names = labelled.names or [f"class {i}" for i in range(1, labelled.classes)]
        values, counts = np.unique(labels, return_counts=True)
        summary = f"{labelled.classes} classes (0 = background); present: " + ", ".join(
            f"{v}{' ' + names[v - 1] if v and v <= len(names) else ''} ({c / labels.size:.1%})"
            for v, c in zip(values, counts))
    if fmt == "nifti":
        write_nifti(labels, geometry, args.out)
    else:
        write_dicom_seg(labels, geometry, args.out, names, family, __version__)
    console.print(escape(f"wrote {args.out} ({fmt}, {geometry.kind} grid {geometry.shape}): "
                         f"{summary}; {segmenter.encoder_calls} encoder calls"))
    return 0
