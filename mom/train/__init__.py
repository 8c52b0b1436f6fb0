"""Pretraining and fine-tuning: typed recipes, the training loop, optimiser groups, DeepSpeed and process setup,
checkpoints, metrics, LoRA presets and the fine-tuning loop.

May import ``mom.model``, ``mom.data``, ``mom.tokenization`` and ``mom.utils``; knows nothing of Mamba internals
(no ``mom.ops``). ``python -m mom.train`` runs the ``mom-train`` command.
"""
