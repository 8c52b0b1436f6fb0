"""A loader of fixed global batches for data-parallel tests: the same global batches whatever the world size.

Global batch ``k`` has GLOBAL_ROWS rows. Rank ``r`` of ``W`` with micro-batches of ``b`` rows reads, at optimizer
step ``k``, the pieces ``r * m + j`` (``j < m``, ``m = grad_accum``) of global batch ``k`` cut into ``b``-row
pieces (``W * m * b = GLOBAL_ROWS``). So one rank with
``grad_accum = W`` reads exactly the rows that ``W`` ranks with ``grad_accum = 1`` read in one step, and a
2-rank run can be compared with a 1-rank run step for step. Rank 1's half of every global batch holds no speech
(an uneven modality mix across ranks). Used in-process (monkeypatched over ``mom.train.loop.build_loader``) and by
the driver of tests/train/test_data_parallel.py under the deepspeed launcher.
"""

from __future__ import annotations

import torch

GLOBAL_ROWS = 4  # rows of a global batch: 2 ranks x 2 rows, or 1 rank x 2 micro-batches of 2 rows


def global_batches(vocab_offsets: list[int], vocab_sizes: list[int], steps: int, seq_len: int,
                   seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``steps`` global batches (GLOBAL_ROWS, seq_len): runs of text, image and speech tokens in rows 0-1, text
    and image only in rows 2-3 (the second half: rank 1's rows in a 2-rank run)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        modality = torch.zeros(GLOBAL_ROWS, seq_len, dtype=torch.long)
        for row in range(GLOBAL_ROWS):
            kinds = 3 if row < GLOBAL_ROWS // 2 else 2  # no speech in the second half
            pos = 0
            while pos < seq_len:
                n = int(torch.randint(4, 16, (1,), generator=g))
                modality[row, pos:pos + n] = int(torch.randint(0, kinds, (1,), generator=g))
                pos += n
        offsets, sizes = torch.tensor(vocab_offsets), torch.tensor(vocab_sizes)
        low = torch.where(modality == 0, 8, 0)  # text ids 0..7 are special tokens
        ids = offsets[modality] + low + (torch.rand(GLOBAL_ROWS, seq_len, generator=g)
                                         * (sizes[modality] - low)).long()
        batches.append({"input_ids": ids, "labels": ids.clone(), "modality_ids": modality})
    return batches


class FixedBatches:
    """The trainer's loader over ``batches`` (see the module docstring); resumable by position."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], rank: int, world_size: int, rows: int,
                 grad_accum: int) -> None:
        self.batches, self.rank, self.rows, self.grad_accum = batches, rank, rows, grad_accum
        assert world_size * rows * grad_accum == GLOBAL_ROWS, "a step must read one whole global batch"
        self.i = 0  # micro-batches read by this rank

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        step, j = divmod(self.i, self.grad_accum)
        if step >= len(self.batches):
            raise StopIteration
        first = (self.rank * self.grad_accum + j) * self.rows
        self.i += 1
        return {k: v[first:first + self.rows].clone() for k, v in self.batches[step].items()}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]
