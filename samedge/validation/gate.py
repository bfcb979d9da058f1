"""Accuracy gates: how far a reduced-precision variant may drift from the FP32 model.

Drift is always measured against the FP32 PyTorch model's *own* masks (see ``drift``), so the FP32
model scores Dice 1.0 against itself and the "mean Dice drop" of a variant is ``1 - mean Dice``.
A gate holds two bounds per precision: the mean Dice drop over all prompts, and the worst single
prompt's Dice. Defaults (overridable everywhere a gate is taken):

========= ==================== ======================
precision max mean Dice drop   min worst-prompt Dice
========= ==================== ======================
int8      0.01                 0.90
bf16      0.005                0.95
fp16      0.002                0.98
========= ==================== ======================

BF16 keeps FP32's exponent but 8 significant bits to FP16's 11, so its gate sits between FP16's and
INT8's; ``int8-bf16`` (an INT8 graph whose float parts run in BF16) takes INT8's.

What a search or the pipeline aims at is stricter: :func:`with_margin` keeps half of each bound's
allowance in reserve, because a variant tuned to the edge of its gate on a few slices fails it on
new ones (measured: an INT8 encoder that passed by 0.0001 on the pipeline's slices failed on 10
unseen MR slices).

An optional bound on the minimum embedding cosine can be added; it is off by default because the
masks, not the embeddings, are what reaches a clinician.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

from samedge.errors import GateFailedError


@dataclass(frozen=True)
class Gate:
    """Bounds one variant must meet; ``None`` switches a bound off."""

    max_mean_dice_drop: float = 0.01
    min_worst_dice: float = 0.90
    min_embedding_cosine: float | None = None
    min_prompts: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_mean_dice_drop <= 1.0:
            raise ValueError(f"max_mean_dice_drop must be in [0, 1], got {self.max_mean_dice_drop}")
        if not 0.0 <= self.min_worst_dice <= 1.0:
            raise ValueError(f"min_worst_dice must be in [0, 1], got {self.min_worst_dice}")

    @property
    def min_mean_dice(self) -> float:
        return 1.0 - self.max_mean_dice_drop

    def score(self, dice_mean: float, dice_min: float) -> float:
        """One number that is >= ``min_mean_dice`` exactly when both Dice bounds hold.

        ``min(mean, worst + (min_mean - min_worst))``: used as the metric of accuracy-controlled
        quantization, whose tools accept a single "higher is better" value and a maximal drop.
        """
        return min(dice_mean, dice_min + (self.min_mean_dice - self.min_worst_dice))

    def evaluate(self, summary: Mapping) -> "GateResult":
        """Check a drift summary (``VariantDrift.summary()`` or a manifest ``validation`` entry)."""
        reasons: list[str] = []
        prompts = int(summary.get("prompts", 0))
        if prompts < self.min_prompts:
            reasons.append(f"only {prompts} prompts measured (gate needs >= {self.min_prompts})")
        mean, worst = float(summary.get("dice_mean", 0.0)), float(summary.get("dice_min", 0.0))
        drop = 1.0 - mean
        if drop > self.max_mean_dice_drop + 1e-12:
            got, bound = _distinct(drop, self.max_mean_dice_drop)
            reasons.append(f"mean Dice vs FP32 {mean:.{max(4, len(got) - 2)}f}: drop {got} > "
                           f"{bound}")
        if worst < self.min_worst_dice - 1e-12:
            where = ""
            if summary.get("worst"):
                case = summary["worst"][0]
                where = f" ({case['slice']}, {case['prompt']})"
            got, bound = _distinct(worst, self.min_worst_dice)
            reasons.append(f"worst prompt Dice {got}{where} < {bound}")
        cosine = summary.get("embedding_cosine_min")
        if self.min_embedding_cosine is not None and cosine is not None \
                and float(cosine) < self.min_embedding_cosine:
            reasons.append(f"embedding cosine {float(cosine):.4f} < {self.min_embedding_cosine}")
        return GateResult(passed=not reasons, reasons=reasons, gate=self,
                          dice_mean=mean, dice_min=worst)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Gate":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _distinct(value: float, bound: float) -> tuple[str, str]:
    """Both numbers with 4 decimals, or as many more as it takes to tell them apart (a drop of
    0.00204 against 0.002 must not read "0.0020 > 0.0020")."""
    for digits in (4, 5, 6, 8):
        a, b = f"{value:.{digits}f}", f"{bound:.{digits}f}"
        if a != b:
            break
    return a, b


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    gate: Gate
    dice_mean: float = 0.0
    dice_min: float = 0.0

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": list(self.reasons), **self.gate.to_dict()}

    def describe(self) -> str:
        if self.passed:
            return (f"pass (mean Dice {self.dice_mean:.4f}, drop ≤ {self.gate.max_mean_dice_drop}; "
                    f"worst {self.dice_min:.4f} ≥ {self.gate.min_worst_dice})")
        return "FAIL: " + "; ".join(self.reasons)

    def raise_if_failed(self, what: str) -> None:
        if not self.passed:
            raise GateFailedError(
                f"{what} drifted beyond its gate: {'; '.join(self.reasons)}",
                hint="keep it out of the bundle, calibrate on more representative slices, or let "
                     "the accuracy-controlled search keep more layers in float",
            )


DEFAULT_GATES: dict[str, Gate] = {
    "int8": Gate(max_mean_dice_drop=0.01, min_worst_dice=0.90),
    "bf16": Gate(max_mean_dice_drop=0.005, min_worst_dice=0.95),
    "fp16": Gate(max_mean_dice_drop=0.002, min_worst_dice=0.98),
    "fp32": Gate(max_mean_dice_drop=0.002, min_worst_dice=0.98),
}

# Share of a gate's allowance a search or the pipeline may use on the data it tunes or checks on.
MARGIN_SHARE = 0.5


def with_margin(gate: Gate, share: float = MARGIN_SHARE) -> Gate:
    """``gate`` with only ``share`` of each allowance: the mean drop bound times ``share``, the
    worst-prompt bound raised to ``1 - share·(1 - bound)`` (INT8's 0.01 / 0.90 → 0.005 / 0.95)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"margin share must be in (0, 1], got {share}")
    return replace(gate, max_mean_dice_drop=gate.max_mean_dice_drop * share,
                   min_worst_dice=1.0 - (1.0 - gate.min_worst_dice) * share)


@dataclass
class GateSet:
    """Gates per precision, with overrides; ``for_precision('int8-mixed')`` uses int8's gate."""

    gates: dict[str, Gate] = field(default_factory=lambda: dict(DEFAULT_GATES))

    def for_precision(self, precision: str) -> Gate:
        base = precision.split("-")[0].lower()
        if base not in self.gates:
            raise ValueError(f"no gate for precision {precision!r} (have {sorted(self.gates)})")
        return self.gates[base]

    def override(self, precision: str | None = None, *, max_mean_dice_drop: float | None = None,
                 min_worst_dice: float | None = None,
                 min_embedding_cosine: float | None = None) -> "GateSet":
        """A copy with bounds replaced for one precision, or for all when ``precision`` is None."""
        changes = {k: v for k, v in (("max_mean_dice_drop", max_mean_dice_drop),
                                     ("min_worst_dice", min_worst_dice),
                                     ("min_embedding_cosine", min_embedding_cosine))
                   if v is not None}
        targets = [precision.split("-")[0].lower()] if precision else list(self.gates)
        gates = dict(self.gates)
        for name in targets:
            gates[name] = replace(gates.get(name, Gate()), **changes)
        return GateSet(gates)

    def evaluate(self, precision: str, summary: Mapping) -> GateResult:
        return self.for_precision(precision).evaluate(summary)
