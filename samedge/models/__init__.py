"""Torch-side model builders: base SAM families and the upstream adaptation formats.

Each builder returns a :class:`~samedge.models.card.ModelCard`, the model plus the data that the
export and the runtime need to treat it correctly (input size, preprocessing, prompt convention).
Families are looked up through :mod:`samedge.models.registry`; importing this package imports no
family module.
"""

from samedge.models.registry import FAMILY_NAMES, build_model, family

__all__ = ["FAMILY_NAMES", "build_model", "family"]
