"""Tests of mom.tokenization.resume: a tokenizer training run stopped by a signal continues from its resume file
exactly as a run never stopped (image VQ and VAE), and a foreign or corrupt resume file is refused by name."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from mom.data.images import iter_image_records
from mom.tokenization import image as image_module
from mom.tokenization import vae as vae_module
from mom.tokenization.image import ImageTokenizerConfig, train_image_tokenizer
from mom.tokenization.resume import TrainingStopped, resume_path
from mom.tokenization.vae import ImageVAEConfig, train_vae

REPO = Path(__file__).resolve().parents[2]
RAW_IMAGES = REPO / "data" / "small" / "raw" / "images"
VQ = dict(codebook_size=32, code_dim=8, channels=(8, 16))
VAE = dict(base_width=8, width_mult=(1, 1, 2), latent_channels=4)
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    records = iter_image_records("folder", on_error=lambda e: pytest.fail(str(e)), path=str(RAW_IMAGES))
    return [r.image for r in records][:24]


def sigterm_at_call(monkeypatch: pytest.MonkeyPatch, cls: type, method: str, call: int) -> None:
    """Make ``cls.method``'s ``call``-th call (1-based) raise a real SIGTERM in this process, as `timeout` would
    send it in the middle of a step."""
    original, calls = getattr(cls, method), [0]

    def wrapped(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            signal.raise_signal(signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)


def train_vq(images, resume=None, lr=3e-3):
    return train_image_tokenizer(images, ImageTokenizerConfig(**VQ), STEPS, 8, lr, 0, images[:8], progress=False,
                                 warmup_steps=1, resume=resume)


def train_tiny_vae(images, resume=None, lr=3e-3):
    return train_vae(images, ImageVAEConfig(**VAE), STEPS, 4, lr, 0, progress=False, held_out=images[:8],
                     warmup_steps=1, resume=resume)


def stop_and_continue(train, images, path: Path, monkeypatch: pytest.MonkeyPatch, owner, method: str, call: int):
    """``train(images)`` straight; the same with ``resume=path``, SIGTERM raised at ``owner.method``'s ``call``-th
    call; then continued from ``path``. -> (the straight result, the `TrainingStopped` info, the continued result)."""
    straight = train(images)
    with monkeypatch.context() as m:
        sigterm_at_call(m, owner, method, call)
        with pytest.raises(TrainingStopped) as stopped:
            train(images, resume=path)
    assert path.exists(), "the stopped run left no resume file"
    return straight, stopped, train(images, resume=path)


def test_vq_stopped_and_continued_equals_a_run_never_stopped(images, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tok.resume.pt"
    (straight, straight_report), stopped, (resumed, report) = stop_and_continue(
        train_vq, images, path, monkeypatch, image_module.VQModel, "forward", 3)
    assert (stopped.value.signum, stopped.value.step, stopped.value.steps) == (signal.SIGTERM, 3, STEPS)
    assert stopped.value.path == path and path.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone
    for name, tensor in straight.model.state_dict().items():  # weights and the codebook's EMA buffers
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert report.final_loss == straight_report.final_loss and report.restarts == straight_report.restarts
    assert report.held_out_psnr == straight_report.held_out_psnr and report.steps == STEPS


def test_vae_stopped_and_continued_equals_a_run_never_stopped(images, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vae.resume.pt"
    (straight, straight_report), stopped, (resumed, report) = stop_and_continue(
        train_tiny_vae, images, path, monkeypatch, vae_module.ImageVAE, "posterior", 2)
    assert stopped.value.step == 2 and path.exists()
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert report.final_loss == straight_report.final_loss and report.final_kl == straight_report.final_kl
    assert report.scaling_factor == straight_report.scaling_factor


def test_a_stop_on_the_last_step_finishes_the_run(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal during the last step leaves nothing to continue: the run ends normally, no file is written."""
    path = tmp_path / "tok.resume.pt"
    sigterm_at_call(monkeypatch, image_module.VQModel, "forward", STEPS)
    _, report = train_vq(images, resume=path)
    assert report.steps == STEPS and not path.exists()


def test_resume_file_of_another_run_or_corrupt_is_refused(images, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tok.resume.pt"
    with monkeypatch.context() as m:
        sigterm_at_call(m, image_module.VQModel, "forward", 2)
        with pytest.raises(TrainingStopped):
            train_vq(images, resume=path)
    saved = path.read_bytes()
    with pytest.raises(ValueError, match=r"tok\.resume\.pt holds a stopped run that differs from this one in training"):
        train_vq(images, resume=path, lr=1e-3)
    with pytest.raises(ValueError, match="differs from this one in held_out_images, train_images"):
        train_vq(images[1:], resume=path)
    with pytest.raises(ValueError, match="differs from this one in .*model"):  # a VQ's file is no VAE's
        train_tiny_vae(images, resume=path)
    assert path.read_bytes() == saved  # a refusal leaves the file as it was
    path.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(ValueError, match=r"tok\.resume\.pt: not a readable resume file .*delete it"):
        train_vq(images, resume=path)


def test_resume_path_is_beside_the_output(tmp_path: Path) -> None:
    assert resume_path(tmp_path / "tokenizers" / "image") == tmp_path / "tokenizers" / "image.resume.pt"
