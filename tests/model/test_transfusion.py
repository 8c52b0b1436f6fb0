"""`mom.model.transfusion`: the losses against hand computations, the dense twin, save/load, FLOP rows, bad inputs,
and a tiny model that learns both modalities."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_transfusion_config
from transformers import AutoModelForCausalLM

import mom
from mom.model.flops import count_params, flop_table
from mom.model.transfusion import (
    MoMTransfusionConfig,
    MoMTransfusionForCausalLM,
    image_numbers,
    patchify,
    unpatchify,
)

BOS, BOI, EOI, EOS = 2, 4, 5, 3


def document(config, caption, n_images=1):
    """<s> caption (<image> IMG*L </image>)*n </s> as one row of ids."""
    img = [BOI] + [config.image_token_id] * config.patches_per_image + [EOI]
    return torch.tensor([[BOS, *caption, *(img * n_images), EOS]])


def test_image_numbers_one_per_run():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert image_numbers(mask).tolist() == [[-1, 0, 0, -1, 1, -1], [2, 2, -1, -1, -1, 3]]


def test_patchify_is_exactly_inverted():
    x = torch.randn(2, 4, 6, 8)
    p = patchify(x, 2)
    assert p.shape == (2, 12, 16)
    assert torch.equal(p[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # row-major patches, (c, p, p) inside
    assert torch.equal(unpatchify(p, 2, 4, 6, 8), x)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 4, 5, 4), 2)


def test_losses_by_hand():
    cfg = tiny_transfusion_config()
    model = MoMTransfusionForCausalLM(cfg).eval()
    ids = document(cfg, [10, 11, 12], n_images=2)  # two images: one timestep each
    L = ids.shape[1]
    latents = torch.randn(1, L, cfg.patch_dim)
    noise = torch.randn(1, L, cfg.patch_dim)
    timesteps = torch.tensor([7, 93])
    out = model(ids, labels=ids, latents=latents, timesteps=timesteps, noise=noise)
    mask = ids == cfg.image_token_id
    # the noise head starts at zero (DiT's init): the diffusion loss is the mean square of the noise
    assert out.modality_losses["image"].item() == pytest.approx(noise[mask].pow(2).mean().item(), rel=1e-6)
    # text: next-token cross-entropy over the targets that are not image positions
    targets = torch.cat([ids[0, 1:], torch.tensor([-100])])
    targets[targets == cfg.image_token_id] = -100
    text = F.cross_entropy(out.logits[0], targets, ignore_index=-100)
    assert out.modality_losses["text"].item() == pytest.approx(text.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(text.item() + 5.0 * noise[mask].pow(2).mean().item(), rel=1e-6)
    assert out.modality_target_counts.tolist() == [float((targets != -100).sum()), float(mask.sum())]

    # with a trained (non-zero) head: the prediction is noise_head(backbone(embeddings of the noised patches))
    torch.nn.init.normal_(model.noise_head.weight)
    out = model(ids, labels=ids, latents=latents, timesteps=timesteps, noise=noise)
    ab = model.schedule.alpha_bar.float()
    t_pos = torch.zeros_like(ids)  # <s> 10 11 12 <image> IMG*4 </image> <image> IMG*4 </image> </s>
    t_pos[0, 5:9], t_pos[0, 11:15] = 7, 93
    assert mask[0, 5:9].all() and mask[0, 11:15].all() and int(mask.sum()) == 8
    x_t = ab[t_pos].sqrt()[..., None] * latents + (1 - ab[t_pos]).sqrt()[..., None] * noise
    embeds = model.backbone.embeddings(ids)
    embeds[mask] = model.image_in(x_t[mask]) + model.time_embed(t_pos[mask])
    hidden = model.backbone(inputs_embeds=embeds, modality_ids=mask.long()).last_hidden_state
    predicted = model.noise_head(hidden[mask])
    want = (predicted - noise[mask]).pow(2).mean()
    assert out.modality_losses["image"].item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(out.predicted_noise[mask], predicted, atol=1e-6)
    assert bool((out.predicted_noise[~mask] == 0).all())


def test_dense_twin_equals_mom_with_tied_experts():
    dense = MoMTransfusionForCausalLM(tiny_transfusion_config(decouple=())).eval()
    torch.nn.init.normal_(dense.noise_head.weight)
    moe = MoMTransfusionForCausalLM(tiny_transfusion_config()).eval()
    state = {}
    for name, tensor in dense.state_dict().items():
        routed = [k for k in moe.state_dict() if k.rsplit(".", 2)[0] + "." + k.rsplit(".", 1)[1] == name
                  and k.rsplit(".", 2)[1] in ("text", "image")]
        for k in routed or [name]:
            state[k] = tensor
    moe.load_state_dict(state)
    ids = document(moe.config, [9, 10])
    L = ids.shape[1]
    kwargs = dict(latents=torch.randn(1, L, 16), timesteps=torch.tensor([40]), noise=torch.randn(1, L, 16))
    a, b = dense(ids, labels=ids, **kwargs), moe(ids, labels=ids, **kwargs)
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
    assert torch.allclose(a.predicted_noise, b.predicted_noise, atol=1e-6)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


def test_save_and_load_through_the_auto_class(tmp_path):
    cfg = tiny_transfusion_config(diffusion_loss_weight=2.0, noise_schedule="linear")
    model = MoMTransfusionForCausalLM(cfg).eval()
    torch.nn.init.normal_(model.noise_head.weight)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, mom.MoMTransfusionForCausalLM) and isinstance(loaded.config, MoMTransfusionConfig)
    assert (loaded.config.diffusion_loss_weight, loaded.config.noise_schedule) == (2.0, "linear")
    ids = document(cfg, [12])
    kwargs = dict(latents=torch.randn(1, ids.shape[1], 16), timesteps=torch.tensor([5]),
                  noise=torch.randn(1, ids.shape[1], 16))
    assert torch.equal(model(ids, labels=ids, **kwargs).loss, loaded(ids, labels=ids, **kwargs).loss)


def test_flop_table_counts_the_image_modules():
    cfg = tiny_transfusion_config()
    model = MoMTransfusionForCausalLM(cfg)
    assert count_params(cfg)[0] == sum(p.numel() for p in model.parameters())  # tied head counted once
    table = flop_table(cfg)
    assert table["image_in"].flops == 2 * cfg.patch_dim * cfg.d_model
    assert table["noise_head"].flops == 2 * cfg.d_model * cfg.patch_dim
    dense = flop_table(tiny_transfusion_config(decouple=()))
    assert table.forward_flops == dense.forward_flops  # MoM: the dense model's FLOPs per token


def test_bad_inputs():
    cfg = tiny_transfusion_config()
    model = MoMTransfusionForCausalLM(cfg)
    ids = document(cfg, [10])
    L = ids.shape[1]
    with pytest.raises(ValueError, match="wrong latent dimension"):
        model(ids, labels=ids, latents=torch.randn(1, L, 12))
    with pytest.raises(ValueError, match="no latents"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="timestep 100 is out of range"):
        model(ids, labels=ids, latents=torch.randn(1, L, 16), timesteps=torch.tensor([100]))
    with pytest.raises(ValueError, match="one timestep per image"):
        model(ids, labels=ids, latents=torch.randn(1, L, 16), timesteps=torch.tensor([1, 2]))
    shifted = torch.roll(ids == cfg.image_token_id, 1, dims=1)
    with pytest.raises(ValueError, match="image span"):
        model(ids, labels=ids, latents=torch.randn(1, L, 16), image_mask=shifted)
    with pytest.raises(ValueError, match="vocab_sizes"):
        tiny_transfusion_config(vocab_sizes=(40, 8))
    with pytest.raises(ValueError, match="latent_size"):
        tiny_transfusion_config(latent_size=5)
    with pytest.raises(ValueError, match="modalities"):
        MoMTransfusionConfig(modalities=("text", "speech"), vocab_sizes=(40, 1))


@pytest.mark.slow
def test_a_tiny_model_learns_both_modalities():
    """300 steps on 4 captioned classes whose latents are fixed per class (plus a little noise): the text loss and
    the diffusion loss both fall (measured on a fixed batch, fixed timesteps and noise)."""
    cfg = tiny_transfusion_config(d_model=32, num_timesteps=1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster (and far faster on a busy machine)
    torch.manual_seed(0)
    model = MoMTransfusionForCausalLM(cfg)
    class_latents = torch.randn(4, cfg.patches_per_image, cfg.patch_dim)
    rows = [document(cfg, [10 + c, 20 + c, 30 + c])[0] for c in range(4)]
    ids = torch.stack(rows * 4)  # (16, l)
    mask = ids == cfg.image_token_id
    latents = torch.zeros(*ids.shape, cfg.patch_dim)
    latents[mask] = class_latents.repeat(4, 1, 1).reshape(-1, cfg.patch_dim)
    fixed = dict(timesteps=torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(1)),
                 noise=torch.randn(*latents.shape, generator=torch.Generator().manual_seed(2)))

    def losses():
        with torch.no_grad():
            out = model(ids, labels=ids, latents=latents, **fixed)
        return out.modality_losses["text"].item(), out.modality_losses["image"].item()

    before = losses()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        out = model(ids, labels=ids, latents=latents + 0.05 * torch.randn_like(latents))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = losses()
    torch.set_num_threads(threads)
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] < 0.5 * before[1], (before, after)
