"""OpenVINO IR from the validated ONNX graphs: FP32, and FP16-compressed weights.

FP16 IR stores weights in half precision (half the file) and OpenVINO decompresses them at load;
on CPUs without native FP16 arithmetic it computes in FP32, so its drift is the weight rounding
alone. INT8 IR comes from ``samedge.quantize`` and lands in the same layout.

The ONNX is read with ``Core.read_model``, not ``ov.convert_model``: every ``convert_model`` call
sends telemetry from a worker thread that forks a process, and that fork deadlocks against numpy's
OpenBLAS when the main thread is inside a matrix product (reproduced: 3 of 3 runs of 40
conversions interleaved with ``np.tensordot`` hung; none with ``read_model``). The CPU plugin
applies its graph optimisations when it compiles the IR, so the saved IR is only less pre-fused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def opt_out_of_telemetry() -> None:
    """No OpenVINO/NNCF usage telemetry from this process.

    Export needs nothing (``read_model`` + ``save_model`` send none; ``convert_model`` would).
    NNCF, which quantizes at ``samedge build`` time, creates an ``openvino_telemetry`` sender at
    import with ``enable_opt_in_dialog=False``, and that treats a missing consent file in
    ``~/intel`` as consent: every ``nncf.quantize`` would send usage events. NNCF turns its sender
    into a stub when ``NNCF_CI`` is set at import (its own switch for CI machines); when nncf is
    already imported, its sender is replaced by that stub here. Nothing is written to the user's
    home directory (``opt_in_out --opt_out`` would change the setting for every OpenVINO tool).
    """
    os.environ.setdefault("NNCF_CI", "1")
    wrapper = sys.modules.get("nncf.telemetry.wrapper")
    if wrapper is not None and not isinstance(wrapper.telemetry, wrapper.NNCFTelemetryStub):
        stub = wrapper.NNCFTelemetryStub()
        for name in ("nncf.telemetry.wrapper", "nncf.telemetry.decorator", "nncf.telemetry"):
            module = sys.modules.get(name)
            if module is not None and hasattr(module, "telemetry"):
                module.telemetry = stub


def convert_to_ir(onnx_path: Path, xml_path: Path, compress_to_fp16: bool) -> list[Path]:
    """Write ``xml_path`` (+ its .bin) and return both paths."""
    opt_out_of_telemetry()
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path, xml_path.with_suffix(".bin")]
