"""jpeft benchmarks (run the scripts from the repository root: ``python benchmarks/<script>.py``)."""
