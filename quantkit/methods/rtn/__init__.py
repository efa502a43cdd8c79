"""Round-to-nearest: no calibration data."""
