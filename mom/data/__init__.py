"""Corpora: raw media sources, corpus building, packing and loading for training."""
