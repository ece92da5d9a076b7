"""Calibration prompts (`prompts.txt`) and activation statistics for SmoothQuant (`collect.py`)."""
