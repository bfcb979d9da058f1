"""OpenVINO IR from the validated ONNX graphs: FP32, and FP16-compressed weights.

FP16 IR stores weights in half precision (half the file) and OpenVINO decompresses them at load;
on CPUs without native FP16 arithmetic it computes in FP32, so its drift is the weight rounding
alone. INT8 IR comes from ``samedge.calibration.quantize`` and lands in the same layout.
"""

from __future__ import annotations

from pathlib import Path


def convert_to_ir(onnx_path: Path, xml_path: Path, compress_to_fp16: bool) -> list[Path]:
    """Write ``xml_path`` (+ its .bin) and return both paths."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path, xml_path.with_suffix(".bin")]
