"""A tiny registry: family name → builder. The builders only pass hyper-parameters."""

from __future__ import annotations

from typing import Callable

from samedge.models.card import ModelCard
from samedge.models.litemedsam import build_litemedsam
from samedge.models.masam import build_masam
from samedge.models.medsa import build_medsa
from samedge.models.sam import build_medsam, build_sam
from samedge.models.samed import build_samed

FAMILIES: dict[str, Callable[..., ModelCard]] = {
    "litemedsam": build_litemedsam,
    "sam": build_sam,
    "medsam": build_medsam,
    "samed": build_samed,
    "medsa": build_medsa,
    "masam": build_masam,
}


def build_model(family: str = "litemedsam", **options) -> ModelCard:
    """Build a family by name; options are the builder's keyword arguments."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family](**options)
