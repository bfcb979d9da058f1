"""Torch-side export: merging, ONNX graphs, OpenVINO IR, TensorRT engines and the bundle."""
