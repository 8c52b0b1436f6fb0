"""Sampling multi-modal documents from a trained model: span constraints for generate() and writing text, PNG and
WAV parts (``document``); images denoised by a Transfusion-setting model (``image_diffusion``); grids of sampled
images, one row per prompt (``grid``).

May import ``mom.model``, ``mom.tokenization`` and ``mom.utils``.
"""
