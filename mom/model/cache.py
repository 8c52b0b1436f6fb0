"""`MoMCache`: the recurrent state of every layer, for O(1)-memory-per-token generation."""

from __future__ import annotations

import torch

from mom.model.config import MoMConfig


class MoMCache:
    """Per layer: the last ``d_conv`` conv inputs (b, d_inner, d_conv) and the SSM state (b, d_inner, d_state).

    ``seqlen_offset`` counts the tokens already consumed; 0 means the next forward is a prefill.
    """

    is_compileable = False  # read by transformers' generate()

    def __init__(
        self,
        config: MoMConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape_conv = (batch_size, config.d_inner, config.d_conv)
        shape_ssm = (batch_size, config.d_inner, config.d_state)
        self.conv_states = [torch.zeros(shape_conv, device=device, dtype=dtype) for _ in range(config.n_layer)]
        # The SSM state is accumulated in fp32 by every backend.
        self.ssm_states = [torch.zeros(shape_ssm, device=device, dtype=torch.float32) for _ in range(config.n_layer)]
        self.seqlen_offset = 0

    @property
    def batch_size(self) -> int:
        return self.conv_states[0].shape[0]

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for states in (self.conv_states, self.ssm_states):
            for i, s in enumerate(states):
                states[i] = s.index_select(0, beam_idx.to(s.device))

    def reset(self) -> None:
        for s in self.conv_states + self.ssm_states:
            s.zero_()
        self.seqlen_offset = 0
