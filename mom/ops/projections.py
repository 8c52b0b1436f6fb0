"""The token-wise projections of a Mamba mixer, named once: `Projection` (an index per projection, in the mixer's
order) and `PROJECTIONS` (their names, which are the mixer's attribute names and ``decouple``'s values)."""

from __future__ import annotations

import enum


class Projection(enum.IntEnum):
    """A mixer projection by index (its position in per-projection tuples); ``.name`` is the mixer's attribute."""

    in_proj = 0  # d_model -> 2 d_inner (x and the gate z)
    x_proj = 1  # d_inner -> dt_rank + 2 d_state (Δ's low-rank input, B, C)
    dt_proj = 2  # dt_rank -> d_inner, with the Δ bias
    out_proj = 3  # d_inner -> d_model


PROJECTIONS: tuple[str, ...] = tuple(Projection.__members__)
