"""Benchmarks: ``python -m benchmarks.run [--quick]`` (performance, issue 5) and ``python -m benchmarks.incremental``."""
