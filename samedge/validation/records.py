"""What a measurement leaves behind: the manifest's validation record and the worst cases."""

from __future__ import annotations

from typing import Sequence

from samedge.validation.drift import SemanticDrift, VariantDrift
from samedge.validation.gate import GateResult
from samedge.validation.references import Measured


class WorstKeeper:
    """``observe`` callback of ``measure_variant``: keeps the k worst prompts' masks."""

    def __init__(self, label: str, measured: Measured, k: int = 4):
        self.label, self.k, self._items = label, k, []
        self._prompts = measured.prompts()

    def __call__(self, item, kind, index, got, want, value) -> None:
        self._items.append((value, item, kind, index, got > 0, want > 0))
        self._items.sort(key=lambda t: t[0])
        del self._items[self.k:]

    def cases(self) -> list:
        from samedge.validation.report import WorstCase

        out = []
        for value, item, kind, index, got, want in self._items:
            prompt = self._prompts.get(item.name)
            box = prompt.boxes[index] if prompt is not None and kind == "box" else None
            out.append(WorstCase(self.label, item.name, f"{kind} {index}", float(value),
                                 item.image, want, got, box))
        return out


def validation_entry(drift: VariantDrift | SemanticDrift, gate: GateResult | None,
                     slice_names: Sequence[str],
                     measured_with: dict) -> dict:
    """The manifest's record of one measurement: summary, per-prompt Dice, gate verdict."""
    entry = {
        **drift.summary(),
        "slices": list(slice_names),  # a semantic summary's slice count is their number
        "reference": "FP32 PyTorch, same preprocessing",
        "measured_with": measured_with,
        "per_prompt": [{"slice": s, "prompt": p, "dice": round(float(d), 6)}
                       for s, p, d in drift.cases],
        "embedding_cosine_per_slice": [round(float(c), 6) for c in drift.embedding_cosine],
    }
    if gate is not None:
        entry["gate"] = gate.to_dict()
    return entry
