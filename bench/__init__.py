"""Benchmarks: every figure is reported as a ratio against a baseline run in the same process."""
