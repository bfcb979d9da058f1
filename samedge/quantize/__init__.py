"""Reduced-precision variants: calibration sets, one module per tool, the accuracy search."""
