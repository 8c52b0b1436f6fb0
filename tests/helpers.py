"""Shared builders for the tests: a tiny MoM config and interleaved token ids (imported as ``helpers``)."""

import pytest
import torch

import mom
from mom.model.modeling import GENERATE_CARRIES_CACHE
from mom.ops.triton import flatcast

# generate() carries MoM's recurrent cache only in transformers >= 5.24 (older ones pass caches under other names
# and the model re-runs the whole sequence each step): tests of the decode path through generate() need it.
needs_generate_cache = pytest.mark.skipif(
    not GENERATE_CARRIES_CACHE, reason="this transformers does not pass MoM's cache through generate() (needs >= 5.24)"
)


def tiny_config(**overrides) -> mom.MoMConfig:
    """A 2-layer MoM over text/image/speech small enough for exact CPU checks."""
    kwargs = dict(vocab_sizes=(40, 24, 16), d_model=16, n_layer=2, d_state=4, d_conv=4, expand=2, dt_rank=3)
    kwargs.update(overrides)
    return mom.MoMConfig(**kwargs)


def interleaved_ids(config: mom.MoMConfig, batch: int, runs: list[tuple[int, int]], generator=None) -> torch.Tensor:
    """Token ids laid out in runs of (modality, length), the same layout for every row."""
    parts = []
    for m, n in runs:
        lo = config.vocab_offsets[m]
        parts.append(torch.randint(lo, lo + config.vocab_sizes[m], (batch, n), generator=generator))
    return torch.cat(parts, dim=1)


class TinyVAE:
    """A test double of `mom.tokenization.vae.ImageVAE`'s interface (``config.latent_channels`` / ``image_size``,
    ``latent_size``, ``encode``, ``decode``): a fixed 4x average-pool "encoder" to RGB + grey channels scaled to
    [-1, 1], and a nearest-neighbour "decoder" of the RGB channels. Deterministic, so models can learn its latents."""

    factor = 4

    def __init__(self, image_size: int = 16) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(latent_channels=4, image_size=image_size)
        self.latent_size = image_size // self.factor

    def encode(self, images) -> torch.Tensor:
        import numpy as np

        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) / 127.5 - 1  # (n, 3, h, w)
        x = torch.nn.functional.avg_pool2d(x, self.factor)
        return torch.cat([x, x.mean(1, keepdim=True)], dim=1)  # (n, 4, h/4, w/4)

    def decode(self, latents: torch.Tensor):
        x = torch.nn.functional.interpolate(latents[:, :3].float(), scale_factor=self.factor, mode="nearest")
        return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def tiny_transfusion_config(**overrides) -> "mom.MoMTransfusionConfig":
    """A 2-layer Transfusion MoM (text vocabulary 40, 4-channel 4x4 latents in 2x2 patches: 4 positions of 16)."""
    kwargs = dict(vocab_sizes=(40, 1), d_model=16, n_layer=2, d_state=4, d_conv=4, expand=2, dt_rank=3,
                  latent_channels=4, latent_size=4, patch_size=2, num_timesteps=100)
    kwargs.update(overrides)
    return mom.MoMTransfusionConfig(**kwargs)


def assert_same_outputs(out, grads: dict, ref, ref_grads: dict, **tol) -> None:
    """Two causal-LM outputs and their parameter gradients (name -> grad) agree: logits, loss, every modality's loss
    (NaN where a modality is absent), every gradient."""
    torch.testing.assert_close(out.logits, ref.logits, **tol)
    torch.testing.assert_close(out.loss, ref.loss, **tol)
    for name, loss in ref.modality_losses.items():
        torch.testing.assert_close(out.modality_losses[name], loss, equal_nan=True, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


def tiny_mamba2_config(**overrides) -> mom.MoMConfig:
    """A tiny `mixer: mamba2` config: two heads of 8 in two groups, chunks of 8 (a 21-token row has a tail)."""
    kwargs = dict(mixer="mamba2", d_model=16, d_state=4, headdim=8, ngroups=2, chunk_size=8)
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def train_losses(model, ids: torch.Tensor, lr: float, steps: int = 5) -> list[float]:
    """The losses of ``steps`` AdamW steps of ``model`` on ``ids`` (labels = ids)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def assert_left_padded_generate_equals_each_row_alone(model) -> None:
    """Greedy ``generate`` of a left-padded batch of two rows gives each row the tokens it gets alone."""
    long = interleaved_ids(model.config, 1, [(0, 3), (1, 5)])
    short = interleaved_ids(model.config, 1, [(0, 2), (2, 3)])
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, alone in ((0, long), (1, short)):
        expected = model.generate(alone, max_new_tokens=5, do_sample=False)[:, -5:]
        assert torch.equal(together[row : row + 1, -5:], expected)


def side_by_side_places():
    """`mom.ops.triton.flatcast`'s places, as the fused path lays out dt_proj: a 7-element tensor, then three (5, 2)
    experts and their (5,) biases as the columns of a (5, 12) matrix, zeros in its last 3 columns
    [W_0 | W_1 | W_2 | b_0 b_1 b_2 | 0 0 0]. -> (tensors, places, the buffer they make)."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(5, 2, generator=g) for _ in range(3)]
    bs = [torch.randn(5, generator=g) for _ in range(3)]
    head = torch.randn(7, generator=g)
    zeros = torch.zeros(5 * 3)
    Place = flatcast.Place
    places = ([Place(0, 7, 0)] + [Place(7 + 2 * m, 2, 12) for m in range(3)] + [Place(13 + m, 1, 12) for m in range(3)]
              + [Place(16, 3, 12)])
    want = torch.cat([head, torch.cat([*ws, *(b[:, None] for b in bs), zeros.view(5, 3)], dim=1).reshape(-1)])
    return [head, *ws, *bs, zeros], places, want
