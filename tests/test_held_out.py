"""The held-out data `samedge validate` and the pipeline's last step measure on: real slices that
no earlier step of the pipeline reads (export check, calibration, tuning, validation, timing)."""

from __future__ import annotations

import numpy as np
import pydicom

from samedge.data.bundled import (
    _package_dir,
    bundled_calibration_paths,
    bundled_slices,
    bundled_stacks,
    held_out_slices,
    held_out_stacks,
    pipeline_validation_slices,
)
from samedge.data.items import read_items
from samedge.pipeline.run import EXPORT_VALIDATION, PIPELINE_STACKS

MASAM_DEPTH = 5  # MA-SAM's default: the deepest stacks the hold-out promises to keep apart


def _study(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_held_out_slices_are_real_and_read_by_no_pipeline_step():
    held = held_out_slices()
    assert len(held) == 11
    names = [s.name for s in held]
    assert len(set(names)) == len(names)
    seen = {s.name for s in pipeline_validation_slices()} | set(EXPORT_VALIDATION)
    assert not seen & set(names)
    for item in held:  # real anatomy, not a blank or a flat frame
        assert item.image.dtype == np.uint8 and item.image.std() > 10, item.name
    # the angiography MIP is a study (subject) that neither validation nor calibration reads
    tof = _package_dir("nibabel", "nicom", "tests", "data", "slicethickness_empty_string.dcm")
    dicom = _package_dir("pydicom", "data", "test_files")
    others = [dicom / s.name for s in pipeline_validation_slices() if s.name.endswith(".dcm")]
    others += [p for p in bundled_calibration_paths() if p.suffix == ".dcm"]
    assert len(others) >= 8
    assert _study(tof) not in {_study(p) for p in others}


def test_held_out_stacks_share_no_slice_with_the_pipelines():
    pipeline = {s.name for stack in bundled_stacks(MASAM_DEPTH, PIPELINE_STACKS) for s in stack}
    held = held_out_stacks(MASAM_DEPTH)
    assert len(held) == 3 and all(len(stack) == MASAM_DEPTH for stack in held)
    names = {s.name for stack in held for s in stack}
    assert not names & pipeline
    assert sum(stack[0].name.startswith("anatomical.nii") for stack in held) == 2


def test_read_items_gives_held_out_data_only_when_asked():
    assert [s.name for s in read_items(None)] == [s.name for s in bundled_slices()]
    assert [s.name for s in read_items(None, held_out=True)] == \
        [s.name for s in held_out_slices()]
    stacks = read_items(None, MASAM_DEPTH, held_out=True)
    assert [[s.name for s in st] for st in stacks] == \
        [[s.name for s in st] for st in held_out_stacks(MASAM_DEPTH)]
