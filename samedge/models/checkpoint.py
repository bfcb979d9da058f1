"""Checkpoint loading that never executes untrusted pickles and explains every mismatch."""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from samedge.errors import CheckpointError, FamilyMismatchError, KeyMismatchError

WRAPPER_KEYS = ("model", "state_dict")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> object:
    """``torch.load(weights_only=True)`` with errors that say which file and what went wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}", hint="check the path you passed")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)", hint="re-copy the file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{what} {path} holds Python objects beyond tensors and plain containers; samedge "
            f"loads checkpoints with weights_only=True and will not execute them ({exc})",
            hint="re-save only the state_dict from a trusted environment: "
            "torch.save(model.state_dict(), path)",
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{what} {path} is corrupt or truncated: {exc}",
            hint="compare its size and sha256 with the original; re-download or re-copy it",
        ) from exc


def state_dict_of(obj: object, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Unwrap the layouts upstream training scripts save: bare, ``{"model": ..}``,
    ``{"state_dict": ..}`` (Med-SA), and DDP's ``module.`` prefix (MedSAM multi-GPU)."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and _is_tensor_dict(inner):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not _is_tensor_dict(obj):
        kind = type(obj).__name__
        keys = list(obj)[:6] if isinstance(obj, dict) else []
        raise CheckpointError(
            f"{path} is not a state dict (got {kind} with keys {keys})",
            hint="pass the file written by torch.save(model.state_dict()) or the training "
            "checkpoint that wraps it under 'model' or 'state_dict'",
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_tensor_dict(obj: dict) -> bool:
    return all(isinstance(k, str) for k in obj) and any(
        isinstance(v, torch.Tensor) for v in obj.values()
    )


def load_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    return state_dict_of(read_checkpoint(path, what), path)


def guess_family(state: dict[str, torch.Tensor]) -> str:
    """Name what a state dict looks like, for error messages ("this is a SAMed LoRA file")."""
    keys = set(state)
    if any(re.fullmatch(r"w_a_\d{3}", k) for k in keys):
        return "SAMed LoRA parameters (w_a_/w_b_)"
    if any(re.fullmatch(r"q_FacTs_\d{3}", k) for k in keys) or "image_encoder.FacTu.weight" in keys:
        return "MA-SAM FacT parameters"
    if any("Space_Adapter" in k for k in keys):
        return "Med-SA adapter model (Space_/MLP_/Depth_Adapter)"
    if any(k.startswith("image_encoder.layers.0.blocks") for k in keys):
        return "LiteMedSAM / TinyViT SAM"
    qkv = state.get("image_encoder.blocks.0.attn.qkv.weight")
    if qkv is not None:
        depth = len({k.split(".")[2] for k in keys if k.startswith("image_encoder.blocks.")})
        width = int(qkv.shape[1])
        size = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}.get((width, depth))
        return f"SAM ViT ({size or 'custom'}: width {width}, depth {depth})"
    if any(k.startswith("mask_decoder.") for k in keys):
        return "SAM prompt encoder + mask decoder only (no image encoder)"
    return "an unknown model"


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], family: str) -> None:
    """Strict load whose error lists missing, unexpected and mis-shaped keys and the likely cause."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        looks_like = guess_family(state)
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 6} more)" if len(items) > 6 else ""
                parts.append(f"{len(items)} {label}: {items[:6]}{more}")
        error = FamilyMismatchError if (missing and unexpected) or shapes else KeyMismatchError
        raise error(
            f"checkpoint does not fit the {family} model; it looks like {looks_like}. "
            + "; ".join(parts),
            hint="choose the --family / model size that produced this checkpoint",
        )
    module.load_state_dict(state, strict=True)
