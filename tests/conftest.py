"""Shared fixtures: the real LiteMedSAM model, bundled real slices, and one exported bundle.

The bundle is exported once per test session (about a minute on 2 cores) and shared read-only;
tests that damage a bundle copy it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from samedge.data.bundled import bundled_slices


@pytest.fixture(scope="session")
def real_slices():
    return bundled_slices()


@pytest.fixture(scope="session")
def litemedsam_card():
    from samedge.models import build_model

    return build_model("litemedsam")


@pytest.fixture(scope="session")
def litemedsam_bundle(tmp_path_factory, litemedsam_card, real_slices) -> Path:
    from samedge.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "litemedsam"
    chosen = [s for s in real_slices if s.name in ("CT_small.dcm", "examples_overlay.dcm")]
    export_bundle(litemedsam_card, out, [s.image for s in chosen],
                  image_names=[s.name for s in chosen])
    return out


@pytest.fixture
def bundle_copy(litemedsam_bundle, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(litemedsam_bundle, target)
    return target
