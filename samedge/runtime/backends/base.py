"""The backend protocol: named float/int numpy arrays in, named numpy arrays out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """One compiled graph. ``run`` takes and returns arrays keyed by the graph's I/O names.

    A backend may also set ``decode_batch`` (int): the most prompts per decoder call it runs
    efficiently; the Predictor splits larger prompt batches into calls of that size.
    ``run`` must be safe to call from any thread (one call at a time per object is enough).
    """

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
