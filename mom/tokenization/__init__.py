"""Tokenizers that turn text, images and speech into ids of the unified MoM vocabulary."""
