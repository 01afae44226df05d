"""Calibration of cascade thresholds on held-out data."""
