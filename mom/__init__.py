"""Mixture-of-Mamba (MoM): multi-modal Mamba language models with modality-aware sparsity."""

from mom.config import MoMConfig

__all__ = ["MoMConfig"]
