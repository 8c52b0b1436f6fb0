"""Evaluation of finished runs: per-modality loss against training FLOPs, and the FLOPs share at which one run
reaches a baseline's loss.

May import ``mom.train`` (its metrics files) and ``mom.utils``.
"""
