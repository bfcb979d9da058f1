"""OpenVINO IR from the validated ONNX graphs: FP32, and FP16-compressed weights.

FP16 IR stores weights in half precision (half the file) and OpenVINO decompresses them at load;
on CPUs without native FP16 arithmetic it computes in FP32, so its drift is the weight rounding
alone. INT8 IR comes from ``samedge.calibration.quantize`` and lands in the same layout.

The ONNX is read with ``Core.read_model``, not ``ov.convert_model``: every ``convert_model`` call
sends telemetry from a worker thread that forks a process, and that fork deadlocks against numpy's
OpenBLAS when the main thread is inside a matrix product (reproduced: 3 of 3 runs of 40
conversions interleaved with ``np.tensordot`` hung; none with ``read_model``). The CPU plugin
applies its graph optimisations when it compiles the IR, so the saved IR is only less pre-fused.
"""

from __future__ import annotations

from pathlib import Path


def convert_to_ir(onnx_path: Path, xml_path: Path, compress_to_fp16: bool) -> list[Path]:
    """Write ``xml_path`` (+ its .bin) and return both paths."""
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path, xml_path.with_suffix(".bin")]
