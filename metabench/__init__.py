"""metabench: a benchmark suite for few-shot transfer of vision foundation models."""

__version__ = "0.1.0"
