"""Corpora: raw media sources (text, images, speech), documents, corpus building, packing and loading for training.

May import ``mom.tokenization`` and ``mom.utils``; nothing of the model or training.
"""
