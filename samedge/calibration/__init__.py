"""Medical image sources turned into display-ready slices for calibration and validation."""
