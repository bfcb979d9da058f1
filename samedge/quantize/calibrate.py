"""``samedge calibrate``: check calibration data and record it in the bundle's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from samedge.data.windows import Window, normalize_window
from samedge.errors import DataSourceError
from samedge.export.bundle import write_manifest
from samedge.progress import Steps
from samedge.quantize.calibset import CalibrationSet
from samedge.runtime.bundle import MANIFEST_NAME, Bundle


# -------------------------------------------------------------------------------------------------
# calibrate / validate / pipeline entry points
# -------------------------------------------------------------------------------------------------
def calibrate_bundle(bundle_path: str | Path, data: Sequence[str | Path] | None,
                     window: Window | None = None, count: int = 300, seed: int = 0,
                     augment: bool = True, modality: str | None = None,
                     family: str = "litemedsam", steps: Steps | None = None,
                     backends: Sequence[str] = ("onnxruntime", "openvino"), **model_options
                     ) -> dict:
    """``samedge calibrate --data DIR --window ct-abdomen -o bundle/``.

    Opens and checks the calibration data (typed errors for empty/unreadable folders and broken
    series; headers only), exports the bundle first when ``bundle_path`` holds none, and records
    the calibration set in the manifest so that ``build`` calibrates on exactly these slices.
    """
    steps = steps or Steps(quiet=True)
    window = normalize_window(window)
    calibration = CalibrationSet(data, count=count, seed=seed, window=window, augment=augment,
                                 modality=modality)
    bundle_path = Path(bundle_path)
    if not (bundle_path / MANIFEST_NAME).is_file():
        from samedge.export.atomic import check_target
        from samedge.export.exporter import export_bundle
        from samedge.models import build_model

        check_target(bundle_path)  # a foreign folder is refused before the model is built
        with steps.step(f"build {family} model"):
            card = build_model(family, **model_options)
        sample = [s for _, s in zip(range(3), calibration.iter_slices())]
        export_bundle(card, bundle_path, [s.image for s in sample], backends=backends,
                      steps=steps, image_names=[s.name for s in sample])
    with steps.step(f"read {calibration.count} calibration slices (one at a time)"):
        stats = calibration_statistics(calibration, Bundle(bundle_path, verify=False))
    manifest = Bundle(bundle_path).manifest
    manifest["calibration"] = {**calibration.describe(), "bundled": data is None,
                               "modality": modality, "statistics": stats,
                               "preprocessing": "samedge.runtime.transforms.preprocess"}
    write_manifest(bundle_path, manifest)
    return manifest


def calibration_statistics(calibration: CalibrationSet, bundle: Bundle) -> dict:
    """Streamed summary of what the encoder will be calibrated on (counts, sizes, input range)."""
    from samedge.runtime.transforms import preprocess

    modalities: dict[str, int] = {}
    lo, hi, means, sources = np.inf, -np.inf, [], set()
    for item in calibration.iter_slices():
        modalities[item.modality] = modalities.get(item.modality, 0) + 1
        tensor, _ = preprocess(item.image, bundle.preprocessing)
        lo, hi = min(lo, float(tensor.min())), max(hi, float(tensor.max()))
        means.append(float(tensor.mean()))
        sources.add(str(item.source) if item.source else item.name)
    if not means:
        raise DataSourceError("calibration data yielded no slices")
    return {"slices": len(means), "sources": len(sources), "modalities": modalities,
            "input_min": lo, "input_max": hi, "input_mean": float(np.mean(means))}
