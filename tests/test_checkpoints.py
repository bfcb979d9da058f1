"""Bad checkpoints get typed errors that name the problem."""

from __future__ import annotations

import pickle

import pytest
import torch

from samedge.errors import CheckpointError, FamilyMismatchError, KeyMismatchError
from samedge.models import build_model
from samedge.models.checkpoint import load_state_dict
from samedge.models.litemedsam import default_checkpoint
from samedge.models.sam import SamConfig, sam_modules


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_model("litemedsam", checkpoint=tmp_path / "nope.pth")


def test_truncated_checkpoint(tmp_path):
    data = default_checkpoint().read_bytes()
    path = tmp_path / "lite_medsam.pth"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        build_model("litemedsam", checkpoint=path)


def test_pickled_objects_are_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed!",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(path)


def test_checkpoint_of_another_family(tmp_path):
    sam = sam_modules(SamConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                                image_size=256))
    path = tmp_path / "sam_small.pth"
    torch.save(sam.state_dict(), path)
    with pytest.raises(FamilyMismatchError, match="looks like SAM ViT") as info:
        build_model("litemedsam", checkpoint=path)
    assert "missing" in str(info.value) and "unexpected" in str(info.value)


def test_wrapped_and_ddp_prefixed_checkpoints_load(tmp_path):
    state = torch.load(default_checkpoint(), weights_only=True)
    path = tmp_path / "train.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    card = build_model("litemedsam", checkpoint=path)
    loaded = card.model.state_dict()
    assert torch.equal(loaded["mask_decoder.mask_tokens.weight"],
                       state["mask_decoder.mask_tokens.weight"])


def test_missing_keys_are_listed(tmp_path):
    state = torch.load(default_checkpoint(), weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(KeyMismatchError, match="mask_decoder.iou_token.weight"):
        build_model("litemedsam", checkpoint=path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict(path)
