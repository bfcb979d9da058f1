"""OpenVINO backend: compiles an IR (or ONNX) for the CPU with latency hints.

Inference precision is f32 unless the variant says otherwise: on CPUs with AMX/AVX512-BF16
OpenVINO would otherwise run bf16 silently, and the drift gate validated f32 arithmetic (the FP16
IR only halves the file). BF16 variants record ``inference_precision="bf16"`` and were validated
with it; nodes whose runtime info carries OpenVINO's ``precise`` mark (disable_fp16_compression,
read back as DisablePrecisionConversion) stay f32 under it (the CPU plugin's keepOrigPrecision).

Graphs with dynamic inputs (the decoder's prompt batch B and point count N) are also compiled
for each concrete input shape they meet, a few kept at a time: OpenVINO's static-shape plans
fuse more (LayerNorm affine, eltwise chains) and skip per-call shape inference. Only small prompt
batches get one (B·N ≤ 8): large batches gain little for much more memory (figures in
docs/performance.md). A shape is compiled the second time it is seen: one-off shapes never pay
it; until then the dynamic plan compiled at load time (which also validates the graph) serves.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openvino as ov

STATIC_PLANS = 4  # concrete input shapes kept compiled per dynamic graph
STATIC_EXTENT = 8  # ... when their dynamic dimensions multiply to at most this (B·N ≤ 8)


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, path: Path, threads: int | None = None, device: str = "CPU",
                 inference_precision: str = "f32"):
        self._core = ov.Core()
        self._config = {"PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":
            self._config["INFERENCE_PRECISION_HINT"] = inference_precision
            if threads:
                self._config["INFERENCE_NUM_THREADS"] = threads
        self._device = device
        self._model = self._core.read_model(str(path))
        self._compiled = self._core.compile_model(self._model, device, self._config)
        self._request = self._compiled.create_infer_request()
        self.input_names = tuple(p.get_any_name() for p in self._compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in self._compiled.outputs)
        self._dynamic_axes = [
            [i for i, dim in enumerate(p.get_partial_shape()) if dim.is_dynamic]
            for p in self._compiled.inputs]
        dynamic = any(self._dynamic_axes)
        self._plans: OrderedDict | None = OrderedDict() if dynamic and device == "CPU" else None
        self._seen: set = set()
        self._lock = threading.Lock()

    def _plan(self, feed: dict[str, np.ndarray]):
        """(compiled model, request) for these input shapes: a static plan once compiled."""
        if self._plans is None:
            return self._compiled, self._request
        key = tuple(np.shape(feed[name]) for name in self.input_names)
        plan = self._plans.get(key)
        if plan is None:
            extent = max(int(np.prod([shape[i] for i in axes])) if axes else 1
                         for shape, axes in zip(key, self._dynamic_axes))
            if extent > STATIC_EXTENT:
                return self._compiled, self._request
            if key not in self._seen:
                if len(self._seen) > 64:
                    self._seen.clear()
                self._seen.add(key)
                return self._compiled, self._request
            model = self._model.clone()
            model.reshape({name: ov.PartialShape(list(shape))
                           for name, shape in zip(self.input_names, key)})
            compiled = self._core.compile_model(model, self._device, self._config)
            plan = (compiled, compiled.create_infer_request())
            self._plans[key] = plan
            if len(self._plans) > STATIC_PLANS:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: inputs[n] for n in self.input_names}
        with self._lock:  # an infer request serves one call at a time ("Infer Request is busy")
            compiled, request = self._plan(feed)
            # share_inputs=False: OpenVINO may otherwise write into caller-owned buffers.
            results = request.infer(feed, share_inputs=False)
            return {
                name: np.array(results[port], copy=True)
                for name, port in zip(self.output_names, compiled.outputs)
            }
