"""OpenVINO backend: compiles an IR (or ONNX) for the CPU with latency hints.

Inference precision is pinned to f32: on CPUs with AMX/AVX512-BF16 OpenVINO would otherwise run
bf16 silently, and the drift gate validated f32 arithmetic (FP16 IR only halves the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, path: Path, threads: int | None = None, device: str = "CPU"):
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":
            config["INFERENCE_PRECISION_HINT"] = "f32"
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(str(path), device, config)
        self._request = self._compiled.create_infer_request()
        self.input_names = tuple(p.get_any_name() for p in self._compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in self._compiled.outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs=False: OpenVINO may otherwise write into caller-owned buffers.
        results = self._request.infer({n: inputs[n] for n in self.input_names}, share_inputs=False)
        return {
            name: np.array(results[port], copy=True)
            for name, port in zip(self.output_names, self._compiled.outputs)
        }
