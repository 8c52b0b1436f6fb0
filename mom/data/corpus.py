"""Open a built corpus for training: the loader its manifest asks for.

    loader = build_loader(DataConfig(path="data/small", seq_len=1024, batch_size=8), rank, world_size)

A corpus of discrete tokens (`mom-data build`) gets `mom.data.loader.PackedLoader`; a corpus of image latents (the
Transfusion setting, `mom-data latents`, its manifest has a ``latent`` entry) gets
`mom.data.latent_corpus.TransfusionLoader`, which adds ``latents`` / ``image_mask`` to each batch.
"""

from __future__ import annotations

from pathlib import Path

from mom.data.latent_corpus import TransfusionLoader
from mom.data.loader import DataConfig, PackedLoader
from mom.utils.configio import read_mapping


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> PackedLoader:
    """The packed batch iterator of data-parallel rank ``rank`` of ``world_size`` over the corpus at ``cfg.path``."""
    manifest = Path(cfg.path) / "manifest.json"
    if manifest.is_file() and "latent" in read_mapping(manifest, "manifest"):
        return TransfusionLoader(cfg, rank, world_size)
    return PackedLoader(cfg, rank, world_size)
