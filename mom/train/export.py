"""The Hugging Face export of a training run: ``save_pretrained`` of the engine's model, with its tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mom.train.checkpoint import remove_dir
from mom.train.distributed import Context, barrier


def export_hf(engine: Any, out: str | os.PathLike, tokenizer_dir: str | os.PathLike | None, ctx: Context) -> Path:
    """``save_pretrained`` (safetensors) of the engine's model into ``out``, with the tokenizer in ``out/tokenizer``.

    Works from every ZeRO stage: under ZeRO-3 the full weights are gathered first (``GatheredParameters``; every
    rank must call this). The weights are the ones the engine computes with (bf16 in a bf16 run). ``out`` is
    replaced atomically.
    """
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    model = engine.module
    if ctx.is_main:
        remove_dir(tmp)
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if ctx.is_main:
                model.save_pretrained(tmp, safe_serialization=True)
    elif ctx.is_main:
        model.save_pretrained(tmp, safe_serialization=True)
    if ctx.is_main:
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        if out.exists():
            remove_dir(out)
        os.rename(tmp, out)
    barrier()
    return out
