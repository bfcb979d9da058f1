"""The FP32 PyTorch reference a bundle is measured against, rebuilt from its manifest.

The checkpoint and base files are checked against the sha256 recorded at export: drift against
another model would not describe this bundle.
"""

from __future__ import annotations

from pathlib import Path

from samedge.errors import SamedgeError
from samedge.runtime.bundle import Bundle, sha256_file

CANNOT = "cannot rebuild the FP32 reference model for this bundle"


def reference_card(bundle: Bundle, card=None):
    """``card`` when given, else the family's model rebuilt from the files the manifest names."""
    if card is not None:
        return card
    from samedge.models.registry import family

    model = bundle.model
    spec = family(model["family"])
    options = spec.rebuild_options(model)
    reason = spec.rebuildable(model) if spec.rebuildable else None
    if reason is None and "checkpoint" not in options and not spec.ships_weights:
        reason = "it was exported from random weights"
    if reason is not None:
        raise SamedgeError(f"{CANNOT}: {reason}", hint="pass the model in Python (card=...)")
    missing = [str(v) for k, v in options.items() if k in ("checkpoint", "base")
               and not Path(v).is_file()]
    if missing:
        raise SamedgeError(f"the FP32 reference model is rebuilt from {', '.join(missing)}, which "
                           "is no longer there", hint="put the checkpoint back where the "
                                                      "bundle was exported from")
    record = model.get("checkpoint") or {}
    for key, digest in (("checkpoint", "sha256"), ("base", "base_sha256")):
        if key in options and record.get(digest) and sha256_file(Path(options[key])) != \
                record[digest]:
            raise SamedgeError(f"{options[key]} changed since the bundle was exported (sha256 "
                               "differs): drift against it would not describe this bundle",
                               hint="restore the exported checkpoint, or export a new bundle")
    try:
        spec.check_options(options)
        return spec.build(**options)
    except SamedgeError as exc:
        raise SamedgeError(f"{CANNOT}: {exc}",
                           hint="pass the model (card=...) or its checkpoint") from exc
