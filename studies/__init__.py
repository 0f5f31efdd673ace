"""Reproducible studies built on metabench (each a driver script, its config and its report code)."""
