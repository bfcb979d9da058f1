"""Accuracy drift against the FP32 PyTorch model: measurement, gates, reports, validate."""
