"""Torch-side model builders: base SAM families and the upstream adaptation formats.

Each builder returns a :class:`~samedge.models.card.ModelCard`, the model plus the data that the
export and the runtime need to treat it correctly (input size, preprocessing, prompt convention).
"""

from samedge.models.card import ModelCard
from samedge.models.registry import FAMILIES, build_model

__all__ = ["FAMILIES", "ModelCard", "build_model"]
