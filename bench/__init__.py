"""Benchmarks: each measures speed, memory or learning quality against a baseline run beside it."""
