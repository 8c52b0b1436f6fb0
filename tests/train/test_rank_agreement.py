"""Decisions about shared files are taken on rank 0 and given to every rank (two gloo processes on CPU): which
checkpoint to resume (even where another rank would judge the files differently) and the same error everywhere."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mom.train import checkpoint as ckpt_module
from mom.train.checkpoint import Checkpointer
from mom.train.distributed import Context, decided_on_main


class Engine:  # the least of a DeepSpeed engine a save needs (this module stays light: each rank imports it)
    def save_checkpoint(self, root, tag, save_latest=True):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "weights.bin").write_bytes(b"weights")


class Loader:
    def state_dict(self):
        return {}


def _rank(rank, world, init_file, root, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ctx = Context(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    if rank == 1:  # this rank alone would reject every checkpoint: it must never be asked
        ckpt_module.verify = lambda path: f"{path} looks damaged from rank 1"
    result = {"chosen": str(Checkpointer(root, 2, ctx).resolve("auto")), "value": decided_on_main(lambda: rank)}
    try:
        decided_on_main(lambda: (_ for _ in ()).throw(ValueError(f"refused on rank {rank}")))
    except ValueError as e:
        result["error"] = str(e)
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow  # two spawned processes (about 30 s on 2 busy cores)
def test_every_rank_gets_rank_zeros_decision(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, keep_last=2, ctx=Context(0, 1, 0, torch.device("cpu")))
    for step in (1, 2):
        newest = ckpt.save(Engine(), Loader(), {"step": step})
    (newest / "weights.bin").write_bytes(b"")  # rank 0 falls back to step 1
    mp.spawn(_rank, args=(2, tmp_path / "init", root, tmp_path), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1] == {"chosen": str(root / "step-00000001"), "value": 0,
                                        "error": "refused on rank 0"}
