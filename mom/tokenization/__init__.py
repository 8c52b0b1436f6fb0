"""Tokenizers that turn text, images and speech into ids of the unified MoM vocabulary, and back.

May import ``mom.utils`` only: tokenizers take arrays and strings, not corpus sources.
"""
