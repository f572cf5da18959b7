"""Test and demo helpers: tiny models and real multi-rank verl checkpoints."""
