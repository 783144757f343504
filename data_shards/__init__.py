"""Datasets to WebDataset shards with the partial-label protocol, and the loaders that stream them.

This package imports nothing from ``sst_dist``.
"""
