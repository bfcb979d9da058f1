"""The accuracy-controlled search as pure logic: which units go back to float.

Units are ordered by a cheap proxy (error with only that unit in INT8) and a bisection over how
many of the most sensitive revert decides on the real metric. Quantization errors of independent
units add up nearly in quadrature, so this finds the float set in about log2(n) real evaluations.
Where reduced precision can pay (INT8 dot products, BF16 units), the passing splits it visited
are then timed against each other and the most precise one no other is clearly faster than wins
(:mod:`samedge.speed.selection`): fewer float units is not always faster. Nothing here imports
onnx, openvino or torch: tests drive it with plain callables and a fake clock.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

from samedge.speed.selection import SelectionRule, select

# time_rounds(models, rounds, first): seconds per round for each model, interleaved
TimeRounds = Callable[[Sequence[Any], int, bool], Sequence[Sequence[float]]]
SPEED_CANDIDATES = 4  # passing splits timed at most: the ones with the fewest float units
# Splits of one precision differ by a few units, so half the pipeline's 10 % default margin
SPLIT_RULE = SelectionRule(margin=0.05)


@dataclass
class Unit:
    """What the accuracy search switches between INT8 and float as one: a quantized op, or the
    ops that read the same activation quantizer (q/k/v projections of one LayerNorm output) —
    one of them cannot go back to float alone while the quantizer stays for the others. With
    ``granularity="block"`` a unit is a whole block (``/layers.2/blocks.3/...``)."""

    name: str
    op_type: str
    quantizers: tuple[str, ...] = ()
    weight: bool = False
    members: tuple[str, ...] = ()


def block_of(op_name: str, depth: int = 2) -> str:
    """``/layers.2/blocks.3/mlp/fc1/MatMul`` → ``/layers.2/blocks.3`` (the module path's head)."""
    parts = [p for p in op_name.split("/") if p]
    return "/" + "/".join(parts[:depth]) if len(parts) > depth else op_name


# -------------------------------------------------------------------------------------------------
# Accuracy-controlled search
# -------------------------------------------------------------------------------------------------
@dataclass
class SearchStep:
    float_units: int
    dice_mean: float
    dice_min: float
    passed: bool
    seconds: float


@dataclass
class SearchResult:
    """What the search decided and why (goes into the manifest and the report)."""

    int8_units: list[str]
    float_units: list[str]
    sensitivity: dict[str, float]
    steps: list[SearchStep] = field(default_factory=list)
    passed: bool = False
    summary: dict = field(default_factory=dict)
    ranking_seconds: float = 0.0
    search_seconds: float = 0.0
    method: str = "search"
    speed: dict | None = None  # the speed-aware pick's evidence, when splits were timed

    def describe(self, top: int = 25) -> dict:
        ranked = sorted(self.sensitivity.items(), key=lambda kv: -kv[1])
        total = sum(self.sensitivity.values())
        return {
            "method": self.method,
            "passed": self.passed,
            "units": len(self.int8_units) + len(self.float_units),
            "int8_units": len(self.int8_units),
            "float_units": self.float_units,
            "most_sensitive": [{"op": name, "rel_err_sq": value,
                                "share": value / total if total else 0.0}
                               for name, value in ranked[:top]],
            "steps": [asdict(s) for s in self.steps],
            "ranking_seconds": self.ranking_seconds,
            "search_seconds": self.search_seconds,
            "speed": self.speed,
        }


def rank_units(units: Sequence[str], realize: Callable[[Collection[str]], Any],
               proxy_error: Callable[[Any], float], steps=None) -> dict[str, float]:
    """Squared relative output error with only one unit quantized, for every unit."""
    scores = {}
    iterator = units if steps is None else steps.track(units, "rank ops by INT8 error",
                                                       total=len(units))
    for name in iterator:
        scores[name] = float(proxy_error(realize([name])))
    return scores


def accuracy_search(units: Sequence[str], realize: Callable[[Collection[str]], Any],
                    measure: Callable[[Any], dict], passes: Callable[[dict], bool],
                    sensitivity: Mapping[str, float] | Callable[[], Mapping[str, float]],
                    steps=None, max_evaluations: int = 10,
                    time_rounds: TimeRounds | None = None,
                    rule: SelectionRule | None = None) -> tuple[Any, SearchResult]:
    """Fewest float units (in sensitivity order) for which ``passes(measure(model))``.
    ``sensitivity`` may be a function that ranks the units: it is called only when the model
    with every unit reduced fails, since ranking costs one evaluation per unit.

    Bisection over k, the number of most sensitive units reverted: k = 0 is full INT8, k = n is
    the float model (passes by definition, never measured). Returns the passing model with the
    smallest k found and the record; when even small k fail and evaluations run out, the best
    passing model found so far (or the float-most one measured) is returned with ``passed`` set.
    With ``time_rounds``, the passing splits found (up to ``SPEED_CANDIDATES``, fewest float
    units first) are timed in interleaved rounds and the pick follows ``rule``: a split with
    fewer float units replaces one with more only when clearly faster.
    """
    order = list(units)  # k = 0 reverts nothing, so the first evaluation needs no ranking
    history: list[SearchStep] = []
    start = time.perf_counter()
    ranking = 0.0  # seconds spent ranking here, when ``sensitivity`` is a function
    cache: dict[int, tuple[Any, dict, bool]] = {}

    def evaluate(k: int):
        if k in cache:
            return cache[k]
        t0 = time.perf_counter()
        model = realize(order[k:])
        summary = measure(model)
        ok = bool(passes(summary))
        history.append(SearchStep(k, summary["dice_mean"], summary["dice_min"], ok,
                                  time.perf_counter() - t0))
        if steps is not None:
            steps.info(f"  {k:3d} units in float: mean Dice {summary['dice_mean']:.4f}, worst "
                       f"{summary['dice_min']:.4f} → {'pass' if ok else 'fail'}")
        cache[k] = (model, summary, ok)
        return cache[k]

    n = len(order)
    lo, hi = -1, None  # lo: largest k known to fail; hi: smallest k known to pass
    model, summary, ok = evaluate(0)
    if ok:
        hi = 0
    else:
        lo = 0
        if callable(sensitivity):
            t0 = time.perf_counter()
            sensitivity = sensitivity()
            ranking = time.perf_counter() - t0
        order.sort(key=lambda u: -sensitivity.get(u, 0.0))
        # Guess from the additive error model: revert until the remaining error falls to 1/4.
        total = sum(sensitivity.get(u, 0.0) for u in order)
        remaining, guess = total, 0
        while guess < n and remaining > total / 16:
            remaining -= sensitivity.get(order[guess], 0.0)
            guess += 1
        probe = max(1, min(guess, n - 1))
        while len(history) < max_evaluations:
            model, summary, ok = evaluate(probe)
            if ok:
                hi = probe
            else:
                lo = probe
            if hi is None:
                if probe >= n - 1:
                    break
                probe = min(n - 1, max(probe + 1, probe * 2))
                continue
            if hi - lo <= 1:
                break
            probe = (lo + hi) // 2
    if hi is None:
        k = max(cache)  # nothing passed: report the float-most measured model
        model, summary, ok = cache[k]
        passed = False
    else:
        k = hi
        model, summary, ok = cache[k]
        passed = True
    speed = None
    if passed and time_rounds is not None:
        k, speed = _fastest_passing(cache, time_rounds, rule or SPLIT_RULE, steps)
        model, summary, ok = cache[k]
    elapsed = time.perf_counter() - start
    result = SearchResult(int8_units=order[k:], float_units=order[:k],
                          sensitivity={} if callable(sensitivity) else dict(sensitivity),
                          steps=history, passed=passed,
                          summary=summary, search_seconds=elapsed - ranking,
                          ranking_seconds=ranking, speed=speed)
    return model, result


def _fastest_passing(cache: Mapping[int, tuple[Any, dict, bool]], time_rounds: TimeRounds,
                     rule: SelectionRule, steps=None) -> tuple[int, dict]:
    """Among the passing splits (k float units), the most precise one that no split with fewer
    float units is clearly faster than; returns (k, evidence for the manifest)."""
    passing = sorted(k for k, (_, _, ok) in cache.items() if ok)[:SPEED_CANDIDATES]
    fewest = passing[0]
    if len(passing) < 2:
        return fewest, {"timed": False, "why": "one passing split: nothing to compare"}
    order = [str(k) for k in sorted(passing, reverse=True)]  # most float (most precise) first
    models = [cache[int(label)][0] for label in order]

    def rounds(count: int, first: bool) -> dict[str, list[float]]:
        timed = time_rounds(models, count, first)
        return {label: list(seconds) for label, seconds in zip(order, timed)}

    selection = select(rounds, order, rule)
    chosen = int(selection.choice)
    if steps is not None:
        medians = ", ".join(
            f"{label} in float {statistics.median(selection.costs[label]) * 1e3:.0f} ms"
            for label in order)
        steps.info(f"  timed the passing splits ({medians}) → {chosen} units in float"
                   + ("" if chosen == fewest else f": {fewest} was not clearly faster"))
    evidence = {"timed": True, "fewest_float": fewest, "chosen_float": chosen,
                "seconds": selection.costs, **selection.evidence(rule)}
    return chosen, evidence
