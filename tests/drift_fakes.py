"""Measured drift without measuring: what a pipeline test feeds the precision step when the
gate's inputs, not the engines, are under test."""

from __future__ import annotations

from samedge.validation.drift import VariantDrift


def fake_drift(precision: str, dice, backend: str = "openvino") -> VariantDrift:
    """A ``VariantDrift`` with the given per-prompt Dice on CT_small.dcm and perfect other
    figures."""
    drift = VariantDrift(backend, precision, dice=list(dice), iou=list(dice),
                         logits_mean_abs=[0.0], embedding_cosine=[1.0], embedding_rel_err=[0.0])
    drift.cases = [("CT_small.dcm", f"box {i}", v) for i, v in enumerate(dice)]
    return drift
