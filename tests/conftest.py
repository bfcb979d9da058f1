"""Shared fixtures: the real LiteMedSAM model, bundled real slices, one exported bundle, and the
synthetic upstream checkpoints every family test reads (written once per session).

The bundle is exported once per test session (about a minute on 2 cores) and shared read-only;
tests that damage a bundle copy it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Fixtures that export a real model or run the pipeline: a test that uses one is in the slow lane
# (`pytest -m "not slow"` skips it); modules that export in every test mark themselves.
SLOW_FIXTURES = frozenset({"litemedsam_bundle", "bundle_copy", "small_checkpoints", "bundles",
                           "cards", "pipelines", "ckpt"})


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

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


def _write(objects: dict, folder: Path) -> dict[str, Path]:
    import torch

    paths = {}
    for name, obj in objects.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(obj, paths[name])
    return paths


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Each family's file in its upstream layout on the 4-block TINY ViT (loader and merge tests)."""
    import upstream_layouts as ul

    folder = tmp_path_factory.mktemp("tiny_ckpt")
    return {**_write({
        "base": ul.sam_base(),
        "samed": ul.samed_file(),
        "samed_s": ul.samed_file(decoder_lora=True),
        "masam": ul.masam_file(),
        "medsa": ul.medsa_checkpoint(ul.medsa_state()),
        "sam_adapter": ul.sam_adapter_state(),
    }, folder), "dir": folder}


@pytest.fixture(scope="session")
def small_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The 3-block SMALL ViT files with audible decoders (export, runtime and CLI tests):
    Med-SA 2D in the zero ``rel_h`` era with legacy clicks, 3D in the ``rel_pos`` era;
    SAM-Adapter saved whole at its training size, 128."""
    from dataclasses import replace

    import upstream_layouts as ul

    return _write({
        "base": ul.sam_base(ul.SMALL),
        "samed": ul.audible(ul.samed_file(ul.SMALL, image_size=128)),
        "masam": ul.audible(ul.masam_file(ul.SMALL, image_size=128)),
        "medsa": ul.medsa_checkpoint(ul.audible(ul.medsa_state(ul.SMALL))),
        "medsa3d": ul.medsa_checkpoint(ul.audible(ul.medsa_state(ul.SMALL, rel="rel_pos",
                                                                 rel_values="random"))),
        "sam_adapter": ul.audible(ul.sam_adapter_state(replace(ul.SMALL, image_size=128))),
    }, tmp_path_factory.mktemp("small_ckpt"))
