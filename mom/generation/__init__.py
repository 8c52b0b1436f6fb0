"""Sampling multi-modal documents from a trained model: span constraints for generate() and writing text, PNG and
WAV parts.

May import ``mom.model``, ``mom.tokenization`` and ``mom.utils``.
"""
