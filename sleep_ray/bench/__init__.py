"""Benchmarks: the continual-learning comparison and the memory footprint (also `sleep-ray bench`)."""
