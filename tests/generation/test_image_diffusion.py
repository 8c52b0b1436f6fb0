"""`mom.generation.image_diffusion` and `mom-generate` on a Transfusion model: the sampler's one forward per step
equals denoising over the prompt's cache, a PNG of the VAE's size, a grid of samples, clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyVAE, tiny_transfusion_config
from PIL import Image

from mom.cli import generate
from mom.generation.image_diffusion import generate_transfusion, load_vae, sample_image
from mom.model.cache import MoMCache
from mom.model.diffusion import ddim_sample
from mom.model.transfusion import MoMTransfusionForCausalLM
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOI_ID, BOS_ID

TOKENIZERS = Path(__file__).resolve().parents[2] / "tokenizers" / "small"
SMALL_VAE = TOKENIZERS / "vae"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = MoMTransfusionForCausalLM(tiny_transfusion_config(vocab_sizes=(2048, 1)))
    torch.nn.init.normal_(model.noise_head.weight, std=0.1)
    out = tmp_path_factory.mktemp("tf") / "hf"
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_sampler_equals_denoising_over_the_prompts_cache(guidance):
    """Each DDIM step runs the prompt and the image span in one forward; the oracle runs the span after the prompt's
    recurrent cache (a copy per step), the recurrence the one forward computes in parallel."""
    model = MoMTransfusionForCausalLM(tiny_transfusion_config()).eval()
    torch.nn.init.normal_(model.noise_head.weight)
    cfg = model.config
    prompt = [BOS_ID, 10, 11, BOI_ID]
    L = cfg.patches_per_image
    ids = torch.full((1, L), cfg.image_token_id)

    def cached(prefix):
        cache = MoMCache(cfg, 1, torch.device("cpu"), torch.float32)
        model(torch.tensor([prefix]), cache=cache, use_cache=True)
        return cache

    caches = {"cond": cached(prompt), "uncond": cached([BOS_ID, BOI_ID])}

    def eps_after(cache, x, t):
        copy = cache.zeros_like()
        copy.conv_states = [c.clone() for c in cache.conv_states]
        copy.ssm_states = [c.clone() for c in cache.ssm_states]
        copy.seqlen_offset = cache.seqlen_offset
        return model(ids, latents=x, timesteps=torch.full((1, L), t), noisy=True, cache=copy,
                     use_cache=True).predicted_noise

    def oracle(x, t):
        eps = eps_after(caches["cond"], x, t)
        if guidance == 1.0:
            return eps
        eps_u = eps_after(caches["uncond"], x, t)
        return eps_u + guidance * (eps - eps_u)

    with torch.no_grad():
        got = sample_image(model, prompt, steps=3, guidance_scale=guidance, generator=torch.Generator().manual_seed(2))
        x_T = torch.randn((1, L, cfg.patch_dim), generator=torch.Generator().manual_seed(2))
        want = ddim_sample(oracle, x_T, model.schedule, 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mom_generate_writes_a_png_of_the_vae_size(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load_vae", lambda path: TinyVAE(16))
    out = tmp_path / "samples"
    argv = ["--model", str(model_dir), "--tokenizer", str(TOKENIZERS), "--prompt", "a red seven", "--then", "image",
            "--steps", "4", "--max-new-tokens", "3", "--guidance", "2.0", "--out", str(out)]
    assert generate.main(argv) == 0
    image = Image.open(out / "image_0.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    assert (out / "text.txt").read_text().startswith("a red seven[image_0.png]")
    assert "from 4 DDIM steps" in capsys.readouterr().out


def test_errors_are_one_line(model_dir, tmp_path, monkeypatch, capsys):
    argv = ["--model", str(model_dir), "--tokenizer", str(TOKENIZERS), "--steps", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(generate, "load_vae", lambda path: TinyVAE(32))  # 8x8 latents for a 4x4 model
    assert generate.main([*argv, "--then", "image"]) == 2
    assert "the VAE makes 4-channel 8x8 latents" in capsys.readouterr().err
    assert generate.main([*argv, "--then", "text"]) == 2
    assert "use --then image" in capsys.readouterr().err


def test_mom_generate_draws_a_grid_with_the_vae(tmp_path_factory, tmp_path, capsys):
    """A Transfusion model over the committed VAE's 4x8x8 latents: one row per prompt, one 32x32 image per seed, each
    the image that `generate_transfusion` makes for that prompt and seed."""
    model = MoMTransfusionForCausalLM(tiny_transfusion_config(vocab_sizes=(2048, 1), latent_size=8))
    torch.nn.init.normal_(model.noise_head.weight, std=0.1)
    directory = tmp_path_factory.mktemp("tf8") / "hf"
    model.save_pretrained(directory)
    grid = tmp_path / "grid.png"
    argv = ["--model", str(directory), "--tokenizer", str(TOKENIZERS), "--vae", str(SMALL_VAE), "--then", "image",
            "--steps", "2", "--prompt", "a red seven", "--prompt", "a smiling face", "--num-samples", "2",
            "--seed", "3", "--grid", str(grid)]  # fmt: skip
    assert generate.main(argv) == 0
    assert "grid of 2 prompt(s) x 2 sample(s) (seeds 3..4) of 32x32 images" in capsys.readouterr().out
    sheet = np.asarray(Image.open(grid))
    row_height = sheet.shape[0] // 2
    assert sheet.shape[1] == 2 * 32 and row_height > 32  # the prompt under each row
    cells = [[sheet[r * row_height : r * row_height + 32, c * 32 : (c + 1) * 32] for c in range(2)] for r in range(2)]
    assert not np.array_equal(cells[0][0], cells[0][1]) and not np.array_equal(cells[1][0], cells[1][1])
    tokenizer = MultimodalTokenizer.load(TOKENIZERS)
    loaded = MoMTransfusionForCausalLM.from_pretrained(directory)
    parts = generate_transfusion(loaded, load_vae(SMALL_VAE), tokenizer, "a smiling face", steps=2, seed=4)
    assert np.array_equal(cells[1][1], parts[1][1])
