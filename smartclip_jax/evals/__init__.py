"""Evaluation suites: the paper's retrieval and zero-shot classification benchmarks."""
