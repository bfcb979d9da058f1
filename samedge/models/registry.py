"""The family registry: one line per family, its module imported only when the family is used.

``import samedge.models.registry`` imports no torch, so the CLI can list families (and the
runtime never needs this module at all). Adding a family = one module that defines a
:class:`~samedge.models.family.Family` + one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from samedge.errors import SamedgeError
from samedge.models.family import Family, Option

# name → "module:attribute" of its Family spec
FAMILY_SPECS = {
    "litemedsam": "samedge.models.litemedsam:FAMILY",
    "sam": "samedge.models.sam:SAM_FAMILY",
    "medsam": "samedge.models.sam:MEDSAM_FAMILY",
    "samed": "samedge.models.samed:FAMILY",
    "medsa": "samedge.models.medsa:FAMILY",
    "masam": "samedge.models.masam:FAMILY",
    "sam_adapter": "samedge.models.sam_adapter:FAMILY",
}
FAMILY_NAMES = tuple(FAMILY_SPECS)


def family(name: str) -> Family:
    """The spec of one family (imports its module, and so torch)."""
    if name not in FAMILY_SPECS:
        raise SamedgeError(f"unknown family {name!r}",
                           hint=f"choose one of {', '.join(sorted(FAMILY_SPECS))}")
    module, attribute = FAMILY_SPECS[name].split(":")
    spec = getattr(importlib.import_module(module), attribute)
    if spec.name != name:
        raise SamedgeError(f"registry line {name!r} points at family {spec.name!r}")
    return spec


def families(names: Iterable[str] | None = None) -> list[Family]:
    return [family(name) for name in (FAMILY_SPECS if names is None else names)]


def all_options() -> list[tuple[Option, list[str]]]:
    """Every option any family takes, once, with the families that take it (for the CLI)."""
    seen: dict[str, tuple[Option, list[str]]] = {}
    for spec in families():
        for option in spec.options:
            known = seen.setdefault(option.name, (option, []))
            if known[0].type is not option.type:
                raise SamedgeError(f"option {option.name!r} has two types across families")
            known[1].append(spec.name)
    return list(seen.values())


def build_model(family_name: str = "litemedsam", **options):
    """Build a family by name; options are the builder's keyword arguments."""
    spec = family(family_name)
    spec.check_options(options)
    return spec.build(**options)
