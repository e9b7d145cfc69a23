"""One-off experiments: each answers one question (experiments/README.md); run from the repository root as
``python -m benchmarks.experiments.<name>``."""
