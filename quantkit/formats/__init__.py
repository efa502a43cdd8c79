"""Checkpoint formats: layouts, packing, writers and the reader that rebuilds packed checkpoints."""
