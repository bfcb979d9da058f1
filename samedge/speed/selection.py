"""Choosing the default variant by a speed advantage that survives load on shared cores.

One run of this project's pipeline made INT8 the default on medians of 3 rounds taken while
other work shared the cores (FP32 1198 ms vs INT8 967 ms); a quieter run of the same commit chose
FP32 (522 vs 578 ms). So a less precise variant replaces a more precise one only when three views
of the same interleaved rounds agree that it is faster by ``margin``:

- best case: its fastest round against the other's fastest (load only ever adds time);
- paired: the median over rounds of its time divided by the other's in the *same* round (both saw
  the same load, which cancels);
- consistency: it beat the other by at least half the margin in ``agreement`` of the rounds.

All three yes: faster. Best case and paired both no: not faster. Anything else is unclear, and
more rounds are timed (up to ``max_rounds``); still unclear, the more precise variant stays.
Pure logic: the timing function is passed in, so tests drive it with a deterministic clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

FASTER, NOT_FASTER, UNCLEAR = "faster", "not faster", "unclear"


@dataclass(frozen=True)
class SelectionRule:
    margin: float = 0.10  # a less precise variant must save at least this share of the time
    rounds: int = 5  # interleaved rounds timed first
    extra_rounds: int = 4  # added while any comparison is unclear ...
    max_rounds: int = 13  # ... up to this many in all
    agreement: float = 0.75  # share of rounds it must win by half the margin

    def __post_init__(self) -> None:
        if not 0.0 < self.margin < 1.0 or not 0.0 < self.agreement <= 1.0:
            raise ValueError("margin must be in (0, 1) and agreement in (0, 1]")
        if not 1 <= self.rounds <= self.max_rounds or self.extra_rounds < 1:
            raise ValueError("need 1 <= rounds <= max_rounds and extra_rounds >= 1")


@dataclass
class Comparison:
    """``candidate`` (less precise) against ``against`` (the choice so far), over the rounds."""

    candidate: str
    against: str
    best_ratio: float
    paired_ratio: float
    wins: float
    verdict: str


def compare(candidate: Sequence[float], against: Sequence[float], rule: SelectionRule,
            names: tuple[str, str] = ("candidate", "against")) -> Comparison:
    """Is ``candidate`` clearly faster than ``against``? Both: seconds per round, same rounds."""
    if len(candidate) != len(against) or not candidate:
        raise ValueError("compare needs the same, non-zero number of rounds for both variants")
    best = min(candidate) / min(against)
    ratios = [c / a for c, a in zip(candidate, against)]
    paired = statistics.median(ratios)
    wins = sum(r <= 1.0 - rule.margin / 2 for r in ratios) / len(ratios)
    bound = 1.0 - rule.margin
    if best <= bound and paired <= bound and wins >= rule.agreement:
        verdict = FASTER
    elif best > bound and paired > bound:
        verdict = NOT_FASTER
    else:
        verdict = UNCLEAR
    return Comparison(names[0], names[1], best, paired, wins, verdict)


@dataclass
class Selection:
    choice: str
    comparisons: list[Comparison]
    rounds: int
    retimed: bool = False
    costs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def unclear(self) -> bool:
        return any(c.verdict == UNCLEAR for c in self.comparisons)

    def faster_than_reference(self, reference: str, rule: SelectionRule) -> list[str]:
        """Variants clearly faster than ``reference`` on their own (not only than the choice)."""
        return [label for label in self.costs if label != reference and
                compare(self.costs[label], self.costs[reference], rule).verdict == FASTER]

    def evidence(self, rule: SelectionRule) -> dict:
        return {"rule": asdict(rule), "rounds": self.rounds, "retimed": self.retimed,
                "comparisons": [asdict(c) for c in self.comparisons]}


def decide(costs: Mapping[str, Sequence[float]], order: Sequence[str],
           rule: SelectionRule) -> Selection:
    """Walk ``order`` from the most precise variant (``order[0]``, the reference) to the least:
    each one becomes the choice only when clearly faster than the choice so far, so a small
    advantage never trades precision away."""
    choice, comparisons = order[0], []
    for label in order[1:]:
        comparison = compare(costs[label], costs[choice], rule, (label, choice))
        comparisons.append(comparison)
        if comparison.verdict == FASTER:
            choice = label
    return Selection(choice, comparisons, len(costs[order[0]]),
                     costs={k: list(costs[k]) for k in order})


def select(time_rounds: Callable[[int, bool], Mapping[str, Sequence[float]]],
           order: Sequence[str], rule: SelectionRule | None = None) -> Selection:
    """Time ``rule.rounds`` rounds (``time_rounds(n, first)`` returns seconds per round for every
    label of ``order``), decide, and time more while a comparison is unclear."""
    rule = rule or SelectionRule()
    costs: dict[str, list[float]] = {label: [] for label in order}
    count, first = rule.rounds, True
    while True:
        timed = time_rounds(count, first)
        for label in order:
            costs[label] += list(timed[label])
        selection = decide(costs, order, rule)
        total = len(costs[order[0]])
        if len(order) == 1 or not selection.unclear or total >= rule.max_rounds:
            selection.retimed = total > rule.rounds
            return selection
        count, first = min(rule.extra_rounds, rule.max_rounds - total), False
