"""SST-Dist: Structured Semantic Transfer (AAAI 2022) for partial-label multi-label recognition."""

__version__ = "0.1.0"
