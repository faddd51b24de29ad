"""Benchmark scripts (run with ``python -m mdm_jax.benchmarks.<name>``)."""
