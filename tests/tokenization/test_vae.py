"""Tests of mom.tokenization.vae (the continuous image VAE) and mom.utils.patches (latent patches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mom.data.images import iter_image_records
from mom.tokenization import vae as vae_module
from mom.tokenization.vae import ImageVAE, ImageVAEConfig, evaluate_vae, psnr, train_vae
from mom.utils.patches import patchify, unpatchify

REPO = Path(__file__).resolve().parents[2]
RAW_IMAGES = REPO / "data" / "small" / "raw" / "images"
SMALL_VAE = REPO / "tokenizers" / "small" / "vae"
TINY = dict(base_width=8, width_mult=(1, 1, 2), latent_channels=4)  # 32x32 -> 4x8x8
PSNR_MARGIN = 0.5  # dB below the stated held-out PSNR that the committed VAE may fall (torch / BLAS versions)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def held_out() -> list[Image.Image]:
    records = iter_image_records("folder", on_error=lambda e: pytest.fail(str(e)), path=str(RAW_IMAGES))
    return [r.image for r in records if r.meta["split"] == "validation"]


@pytest.fixture(scope="module")
def tiny_vae() -> ImageVAE:
    torch.manual_seed(0)
    return ImageVAE(ImageVAEConfig(**TINY)).eval()


# ---- the committed VAE -------------------------------------------------------------------------------------------
def test_committed_vae_round_trip_reaches_its_stated_psnr(held_out: list[Image.Image]) -> None:
    vae = ImageVAE.from_pretrained(SMALL_VAE)
    report = json.loads((SMALL_VAE / vae_module.REPORT_FILE).read_text())
    assert (vae.config.image_size, vae.config.latent_channels, vae.latent_size) == (32, 4, 8)
    metrics = evaluate_vae(vae, held_out)
    assert metrics["images"] == report["held_out_images"] == 70
    assert metrics["psnr"] >= report["held_out_psnr"] - PSNR_MARGIN
    assert abs(metrics["latent_std"] - 1) < 0.3 and abs(metrics["latent_mean"]) < 0.3  # scaled to about unit std


# ---- patches -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p, c, h, w", [(1, 4, 8, 8), (2, 4, 8, 8), (4, 3, 8, 12), (2, 8, 16, 16)])
def test_patchify_and_unpatchify_are_exact_inverses(p: int, c: int, h: int, w: int) -> None:
    latents = torch.randn(3, c, h, w)
    patches = patchify(latents, p)
    assert patches.shape == (3, (h // p) * (w // p), c * p * p)
    assert torch.equal(unpatchify(patches, p, c, h, w), latents)
    assert torch.equal(patchify(unpatchify(patches, p, c, h, w), p), patches)
    # Patch j is grid cell (j // (w/p), j % (w/p)), its features ordered (row, column, channel).
    j = patches.shape[1] - 1 if p > 1 else 5
    r, q = divmod(j, w // p)
    cell = latents[1, :, r * p : (r + 1) * p, q * p : (q + 1) * p].permute(1, 2, 0)  # (p, p, c)
    assert torch.equal(patches[1, j].view(p, p, c), cell)


def test_patch_shape_errors() -> None:
    assert (vae_module.patchify, vae_module.unpatchify) == (patchify, unpatchify)  # also importable beside the VAE
    with pytest.raises(ValueError, match="not divisible into 3x3"):
        patchify(torch.zeros(1, 4, 8, 8), 3)
    with pytest.raises(ValueError, match=r"expected a tensor \(n, c, h, w\)"):
        patchify(torch.zeros(4, 8, 8), 2)
    with pytest.raises(ValueError, match="patch size"):
        patchify(torch.zeros(1, 4, 8, 8), 0)
    with pytest.raises(ValueError, match=r"expected shape \(n, 16, 16\)"):
        unpatchify(torch.zeros(1, 16, 12), 2, 4, 8, 8)


# ---- encode / decode ---------------------------------------------------------------------------------------------
def test_encode_decode_shapes_dtypes_and_inputs(tiny_vae: ImageVAE, held_out: list[Image.Image]) -> None:
    vae = tiny_vae
    pixels = np.stack([np.asarray(im) for im in held_out[:5]])  # uint8 (5, 32, 32, 3)
    z = vae.encode(pixels)
    assert z.shape == (5, 4, 8, 8) and z.dtype == torch.float32
    assert torch.equal(vae.encode(torch.from_numpy(pixels)), z)
    assert torch.equal(vae.encode(held_out[:5]), z)  # PIL images, already 32x32
    assert torch.allclose(vae.encode(pixels.astype(np.float64) / 255), z, atol=1e-5)  # floats in [0, 1]
    images = vae.decode(z)
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape == (5, 32, 32, 3)
    assert np.array_equal(vae.decode(z.numpy()), images)
    assert vae.decode(z[:0]).shape == (0, 32, 32, 3) and vae.encode(pixels[:0]).shape == (0, 4, 8, 8)
    drawn = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(1))
    again = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again) and not torch.equal(drawn, z)


def test_latents_are_shifted_and_scaled(tiny_vae: ImageVAE, held_out: list[Image.Image]) -> None:
    config = ImageVAEConfig(**TINY, scaling_factor=2.0, shift_factor=0.5)
    scaled = ImageVAE(config).eval()
    scaled.load_state_dict(tiny_vae.state_dict())
    z = tiny_vae.encode(held_out[:4])
    assert torch.allclose(scaled.encode(held_out[:4]), (z - 0.5) * 2.0, atol=1e-6)
    assert np.array_equal(scaled.decode((z - 0.5) * 2.0), tiny_vae.decode(z))


def test_bad_inputs_raise_clear_errors(tiny_vae: ImageVAE) -> None:
    vae = tiny_vae
    with pytest.raises(ValueError, match="64x64 pixels, but this VAE takes 32x32"):
        vae.encode(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"3 channels in the last dimension \(channels last"):
        vae.encode(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(np.zeros((2, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match=r"expected a batch \(n, 32, 32, 3\)"):
        vae.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        vae.encode(np.full((1, 32, 32, 3), 255.0))
    with pytest.raises(ValueError, match="int64"):
        vae.encode(np.zeros((1, 32, 32, 3), np.int64))
    with pytest.raises(ValueError, match=r"expected 4 dimensions \(n, 4, 8, 8\)"):
        vae.decode(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"expected shape \(n, 4, 8, 8\).*\(1, 8, 8, 8\)"):
        vae.decode(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"expected shape \(n, 4, 8, 8\).*\(1, 4, 16, 16\)"):
        vae.decode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        vae.decode(torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="floating"):
        vae.decode(torch.zeros(1, 4, 8, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "field, value, message",
    [("downsample", 3, "power of two"), ("image_size", 30, "not divisible"), ("width_mult", (1, 2), "3 entries"),
     ("channels", 2, "3 .RGB. or 1"), ("latent_channels", 0, "positive integer"), ("kl_weight", -1.0, ">= 0"),
     ("scaling_factor", 0.0, "> 0")],
)  # fmt: skip
def test_config_is_validated(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"{field}: .*{message}"):
        ImageVAEConfig(**{**TINY, field: value})


def test_grey_vae_takes_and_gives_one_channel(held_out: list[Image.Image]) -> None:
    vae = ImageVAE(ImageVAEConfig(**TINY, channels=1)).eval()
    z = vae.encode(held_out[:2])  # PIL images become grey
    assert z.shape == (2, 4, 8, 8) and vae.decode(z).shape == (2, 32, 32, 1)
    assert torch.equal(vae.encode(np.stack([np.asarray(im.convert("L"))[..., None] for im in held_out[:2]])), z)


# ---- files -------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tiny_vae: ImageVAE, held_out: list[Image.Image], tmp_path: Path) -> None:
    tiny_vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ImageVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config == tiny_vae.config
    z = tiny_vae.encode(held_out[:3])
    assert torch.equal(loaded.encode(held_out[:3]), z)
    assert np.array_equal(loaded.decode(z), tiny_vae.decode(z))


def test_file_errors_name_the_file(tiny_vae: ImageVAE, tmp_path: Path) -> None:
    d = tmp_path / "vae"
    tiny_vae.save_pretrained(d)
    weights, config = d / "model.safetensors", d / "config.json"
    good_config = config.read_text()
    with pytest.raises(FileNotFoundError, match="absent/config.json"):
        ImageVAE.from_pretrained(tmp_path / "absent")
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors: cannot read weights"):
        ImageVAE.from_pretrained(d)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: weights file missing"):
        ImageVAE.from_pretrained(d)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        ImageVAE.from_pretrained(d)
    config.write_text(good_config.replace('"latent_channels": 4', '"latent_channels": 0'))
    with pytest.raises(ValueError, match="config.json: latent_channels: must be a positive integer"):
        ImageVAE.from_pretrained(d)
    config.write_text(good_config.replace('"kl-image-vae"', '"vq-image"'))
    with pytest.raises(ValueError, match="kind is 'vq-image'"):
        ImageVAE.from_pretrained(d)
    tiny_vae.save_pretrained(d)  # weights of another width than the config says
    config.write_text(good_config.replace('"base_width": 8', '"base_width": 16'))
    with pytest.raises(ValueError, match="model.safetensors: tensor .* has shape"):
        ImageVAE.from_pretrained(d)


def test_a_failed_save_leaves_the_old_directory(tiny_vae: ImageVAE, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import safetensors.torch

    d = tmp_path / "vae"
    tiny_vae.save_pretrained(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny_vae.save_pretrained(d)
    with pytest.raises(OSError, match="disk full"):
        tiny_vae.save_pretrained(tmp_path / "new")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no half-written directory, no temporary left


# ---- training ----------------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_scales_latents(held_out: list[Image.Image]) -> None:
    config = ImageVAEConfig(**TINY)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in held_out]))  # (70, 32, 32, 3)
    torch.manual_seed(0)
    untrained = ImageVAE(config).eval()  # train_vae's initial weights (seeded the same way)
    vae, report = train_vae(pixels, config, steps=30, batch_size=8, lr=3e-3, seed=0, progress=False,
                            held_out_fraction=0.2, warmup_steps=5)  # fmt: skip
    assert (report.train_images, report.held_out_images) == (56, 14)
    before = psnr(pixels, torch.from_numpy(untrained.decode(untrained.encode(pixels))))
    after = psnr(pixels, torch.from_numpy(vae.decode(vae.encode(pixels))))
    assert after > before + 3, (before, after)
    assert report.held_out_psnr > before
    # scaling_factor / shift_factor come from the training images' posterior means: unit std, zero mean there.
    order = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    z = vae.encode(pixels[order[14:]]).double()
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-4


def test_training_is_deterministic_for_a_seed(held_out: list[Image.Image]) -> None:
    config = ImageVAEConfig(**TINY)
    runs = [train_vae(held_out[:20], config, steps=3, batch_size=4, seed=seed, progress=False, warmup_steps=1)[0]
            for seed in (0, 0, 1)]  # fmt: skip
    same = [all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), run.state_dict().values()))
            for run in runs[1:]]  # fmt: skip
    assert same == [True, False] and runs[0].config == runs[1].config


def test_training_input_errors() -> None:
    config = ImageVAEConfig(**TINY)
    pixels = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="no held-out or no training image"):
        train_vae(pixels, config, steps=1, progress=False, held_out_fraction=0.05)
    with pytest.raises(ValueError, match="recon_loss"):
        train_vae(pixels, config, steps=1, progress=False, recon_loss="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="held_out: no images"):
        train_vae(pixels, config, steps=1, progress=False, held_out=pixels[:0])
    with pytest.raises(ValueError, match="64x64 pixels"):
        train_vae(np.zeros((4, 64, 64, 3), np.uint8), config, steps=1, progress=False)


def test_a_non_finite_loss_stops_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop reads its loss on the host only every `SHOW_EVERY` steps (and at its first): a NaN loss stays in the
    EMA and is named there, with the step."""
    config = ImageVAEConfig(**TINY)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(vae_module.F, "mse_loss", lambda a, b: (a - b).pow(2).mean() * float("nan"))
    with pytest.raises(FloatingPointError, match=r"^by step 0: the training loss is nan \(lower lr\?\)"):
        train_vae(pixels, config, steps=3, batch_size=4, progress=False, held_out=pixels[:2])
