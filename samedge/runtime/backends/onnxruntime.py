"""ONNX Runtime backend (CPU, or CUDA when onnxruntime-gpu finds a device)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort


class OnnxRuntimeBackend:
    name = "onnxruntime"
    # Prompts per decoder call the Predictor sends (it splits larger batches). LiteMedSAM on a
    # 2-core AVX2 CPU, 16 boxes, per box: 22.6 ms in calls of 1 or 2, 23.1 in calls of 4,
    # 24.5-24.8 in calls of 8 or 16 (each box carries 64x64x256 intermediates); a later run gave
    # 25.5 (K=1), 25.9 (K=2), 27.5-28.8 (K=4..16). Calls of one are never slower, so one call of
    # 16 costs what 16 single calls cost, at the smallest peak memory. OpenVINO showed the
    # opposite (27.2 ms singly, 25.8 batched), so it takes whole batches.
    decode_batch = 1

    def __init__(self, path: Path, threads: int | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        self._lock = threading.Lock()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: inputs[name] for name in self.input_names}
        with self._lock:  # concurrent runs are legal in ONNX Runtime but each holds its memory
            return dict(zip(self.output_names, self._session.run(None, feed)))
