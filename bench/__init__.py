"""Speed benchmarks that print figures side by side with the official code's (REFERENCE_PERF.md); they never
assert timings. Run from the repository root as modules, e.g. `python -m bench.decode --threads 2`."""
