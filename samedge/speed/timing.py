"""One way to time variants against each other: warm up, then rounds interleaved across variants.

The cores are shared with other work, so a variant timed alone after another sees a different
machine; interleaving round by round gives every variant the same load, and the rotation of the
order each round keeps any variant from always following the same one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

Calls = Sequence[Callable[[], object]]


def interleaved(variants: Sequence[Calls], rounds: int, warmup: int = 1, rotate: bool = True,
                settle_s: float = 0.0, clock: Callable[[], float] = time.perf_counter,
                sleep: Callable[[float], object] = time.sleep) -> list[list[list[float]]]:
    """``samples[v][c]``: the seconds of call ``c`` of variant ``v`` in each timed round.

    Each round runs every variant's calls in order (encode, then decode: a decoder call needs
    its encoder's embedding); ``settle_s`` pauses before each timed call so the previous
    variant's spinning threads go idle. ``clock`` and ``sleep`` are injectable for tests.
    """
    samples = [[[] for _ in calls] for calls in variants]
    order = list(range(len(variants)))
    for index in range(warmup + rounds):
        shift = index % len(order) if rotate and order else 0
        for v in order[shift:] + order[:shift]:
            for c, call in enumerate(variants[v]):
                if settle_s:
                    sleep(settle_s)
                start = clock()
                call()
                elapsed = clock() - start
                if index >= warmup:
                    samples[v][c].append(elapsed)
    return samples
