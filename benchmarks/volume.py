"""Volume segmentation throughput: ``samedge segment``'s work end to end against the floor of
(encoder + one decode) per slice, measured in the same run.

Prints tables; never run as a test. The volume is a synthetic CT series (an ellipsoid in noise,
512² slices, 0.7 x 0.7 x 2.5 mm, oblique) written as DICOM files, and the prompt its ground
truth's 3-D box, so every variant decodes the same slices. Variants are interleaved round by
round (``speed.timing.interleaved``, the order rotating), after one warm-up round:

  per slice   for each slice in the box: ``Predictor.set_image`` (preprocessing + encoder) and
              one ``predict`` of the slice's box; images already in memory (the floor)
  segment     open the series (headers), read each slice (DICOM decode, HU, window), encode,
              propagate the box slice by slice, write the NIfTI: seconds per volume, and per
              decoded slice; ``overlap`` encodes the next slice while the current one decodes

    python benchmarks/volume.py                   # exports a LiteMedSAM bundle to a temp dir
    python benchmarks/volume.py --bundle /tmp/b --backend onnxruntime --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import volume_data as vd  # noqa: E402  (tests/volume_data.py: the synthetic volumes)
from workload import bundle_or_export, loadavg  # noqa: E402

from samedge.data.open import open_volume  # noqa: E402
from samedge.data.writers import write_nifti  # noqa: E402
from samedge.runtime import Predictor, VolumePredictor  # noqa: E402
from samedge.runtime.cpu import cpu_name, isa_summary  # noqa: E402
from samedge.speed.timing import interleaved  # noqa: E402


def make_series(folder: Path, size: int, slices: int) -> tuple[Path, np.ndarray]:
    shape = (size, size, slices)
    centre = (size * 0.55, size * 0.45, (slices - 1) / 2)
    radii = (size * 0.22, size * 0.18, slices * 0.42)
    data, truth = vd.ellipsoid(shape, centre, radii)
    nifti = vd.write_nifti(folder / "volume.nii.gz", data,
                           vd.affine("oblique", spacing=(0.7, 0.7, 2.5)))
    return vd.nifti_to_series(nifti, folder / "series"), truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bundle, keep = bundle_or_export(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="samedge-volume-"))
    series, truth = make_series(work, args.size, args.slices)
    predictor = Predictor(bundle, backend=args.backend, precision="fp32", threads=args.threads)
    geometry = open_volume(series).geometry
    order = [int(f.stem.split("_")[-1]) for f in geometry.files]
    box = vd.truth_box(truth)
    n0, n1 = sorted(order.index(k) for k in (box[2], box[5]))
    box3d = (box[0], box[1], n0, box[3], box[4], n1)
    images = [s.image for s in open_volume(series)]
    boxes = {n: np.array(box3d[:2] + box3d[3:5], float) for n in range(n0, n1 + 1)}
    counts = {}

    def per_slice():
        for n, slice_box in boxes.items():
            predictor.set_image(images[n])
            predictor.predict(boxes=slice_box, multimask_output=False)

    def segment(overlap: bool, refine: bool = False):
        def run():
            volume = open_volume(series)
            segmenter = VolumePredictor(predictor, overlap=overlap, refine=refine)
            segmenter.set_volume(volume.images())
            result = segmenter.predict_box(box3d)
            write_nifti(result.mask.astype(np.uint8), volume.geometry, work / "seg.nii.gz")
            counts[(overlap, refine)] = (result.decoded.size, segmenter.encoder_calls,
                                         vd.dice(volume.geometry.to_stored(result.mask), truth))
        return run

    variants = {"per slice: set_image + predict": per_slice,
                "segment, overlap": segment(True), "segment, serial": segment(False)}
    started = time.perf_counter()
    samples = interleaved([[call] for call in variants.values()], rounds=args.rounds, warmup=1,
                          settle_s=0.05)
    elapsed = time.perf_counter() - started
    segment(False, refine=True)()
    print(f"\nmachine: {cpu_name()} ({isa_summary()}), {args.threads} threads, load {loadavg()}")
    print(f"bundle: {bundle} ({predictor.backend} {predictor.precision}); volume {args.size}² x "
          f"{args.slices} DICOM slices, box over slices {n0}..{n1} ({len(boxes)} slices); "
          f"{args.rounds} rounds after 1 warm-up, {elapsed:.0f} s\n")
    floor = statistics.median(samples[0][0]) / len(boxes)
    floor_min = min(samples[0][0]) / len(boxes)
    print("| variant | s / volume, median (min) | s / slice | × (encoder + 1 decode), median "
          "(min) | slices decoded | encoder calls | Dice vs truth |")
    print("|---|---|---|---|---|---|---|")
    for (name, _), runs in zip(variants.items(), samples):
        median, low = statistics.median(runs[0]), min(runs[0])
        key = {"segment, overlap": (True, False), "segment, serial": (False, False)}.get(name)
        decoded, calls, score = counts.get(key, (len(boxes), len(boxes), float("nan")))
        per = median / decoded
        print(f"| {name} | {median:.2f} ({low:.2f}) | {per:.3f} | {per / floor:.2f} "
              f"({low / decoded / floor_min:.2f}) | {decoded} | {calls} | {score:.4f} |")
    decoded, calls, score = counts[(False, True)]
    print(f"\nrefine (previous slice's low-res logits as mask_input): Dice {score:.4f} vs "
          f"{counts[(False, False)][2]:.4f} without, {decoded} slices decoded")
    if keep is not None:
        keep.cleanup()


if __name__ == "__main__":
    main()
