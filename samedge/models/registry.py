"""A tiny registry: family name → builder. The builders only pass hyper-parameters."""

from __future__ import annotations

import inspect
from typing import Callable

from samedge.errors import SamedgeError

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
        raise SamedgeError(f"unknown family {family!r}",
                           hint=f"choose one of {', '.join(sorted(FAMILIES))}")
    builder = FAMILIES[family]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SamedgeError(
            f"family {family!r} does not take {', '.join(unknown)}",
            hint=f"its options are: {', '.join(accepted)}",
        )
    missing = [name for name, p in accepted.items()
               if p.default is inspect.Parameter.empty and name not in options]
    if missing:
        raise SamedgeError(f"family {family!r} needs {', '.join(missing)}",
                           hint="e.g. --base sam_vit_b_01ec64.pth --checkpoint epoch_159.pth")
    return builder(**options)
