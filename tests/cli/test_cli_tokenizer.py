"""`mom-tokenizer text|image|speech ...`: training, evaluation and decoding from the command line, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mom.cli.tokenizer import main
from mom.tokenization import special
from mom.tokenization.speech import SpeechTokenizer
from mom.tokenization.text import TextTokenizer
from mom.utils.audio import read_audio, write_audio

ROOT = Path(__file__).resolve().parents[2]
RAW_TEXT = ROOT / "data" / "small" / "raw" / "text"
RAW_IMAGES = ROOT / "data" / "small" / "raw" / "images"
CLIPS = ROOT / "data" / "small" / "raw" / "speech" / "clips"


def test_text_train_and_encode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"vocab_size: 400\nmodel_type: unigram\nsources:\n  - {{source: folder, path: {RAW_TEXT}}}\n")
    assert main(["text", "train", "--recipe", str(recipe), "--out", str(tmp_path / "tok")]) == 0
    assert "chars/token" in capsys.readouterr().out
    trained = TextTokenizer.load(tmp_path / "tok")
    assert trained.vocab_size == 400
    assert [trained.id_to_piece(i) for i in range(8)] == [t.piece for t in special.SPECIAL_TOKENS]
    assert trained.recipe["sources"] == [{"source": "folder", "path": str(RAW_TEXT)}]  # the recipe is recorded
    assert trained.decode(trained.encode("Hello,  world\n")) == "Hello,  world\n"
    assert main(["text", "encode", "--tokenizer", str(tmp_path / "tok"), "Hello"]) == 0
    pieces = capsys.readouterr().out.split()
    assert [int(p.rsplit(":", 1)[1]) for p in pieces] == trained.encode("Hello")


def test_text_train_with_no_text_is_a_one_line_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"vocab_size: 400\nsources:\n  - {{source: folder, path: {tmp_path / 'empty'}}}\n")
    assert main(["text", "train", "--recipe", str(recipe), "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err  # a progress bar, then the error
    assert err.splitlines()[-1].startswith("mom-tokenizer: error: ") and "yielded no text" in err
    assert "Traceback" not in err
    assert not (tmp_path / "tok").exists()


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["speech", "eval", "--tokenizer", str(tmp_path / "absent")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mom-tokenizer: error: ") and "absent" in err
    with pytest.raises(FileNotFoundError, match="absent"):
        main([*args, "--debug"])
    with pytest.raises(SystemExit) as usage:
        main(["video", "train"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as help_exit:
        main(["speech", "train", "--help"])
    assert help_exit.value.code == 0 and "mom-tokenizer speech train" in capsys.readouterr().out


def _tiny_vq_recipe(tmp_path: Path, folder: str, limit: int, steps: int) -> str:
    """A tiny VQ recipe over ``limit`` images of ``folder``, written to tmp_path/r.yaml; -> its path."""
    recipe = {
        "sources": [{"source": "folder", "options": {"path": folder, "limit": limit, "seed": 0}}],
        "tokenizer": {"codebook_size": 32, "code_dim": 8, "channels": [8, 16]},
        "training": {"steps": steps, "batch_size": 8, "warmup_steps": 1},
        "held_out_fraction": 0.2,
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    return str(tmp_path / "r.yaml")


def test_image_train_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tok"
    train = ["image", "train", "--recipe", _tiny_vq_recipe(tmp_path, "unused", limit=60, steps=5), "--out", str(out)]
    assert main([*train, "--opt", f"folder.path={RAW_IMAGES}"]) == 0  # --opt overrides a source option
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 5 and report["held_out_images"] + report["train_images"] == 60
    assert "PSNR" in capsys.readouterr().out
    assert main([*train, "--opt", f"folder.path={RAW_IMAGES}"]) == 2  # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    assert main([*train, "--overwrite", "--opt", "digits.limit=3"]) == 2
    assert "no source 'digits'" in capsys.readouterr().err
    assert main(["image", "eval", "--tokenizer", str(out), "--images", str(RAW_IMAGES), "--split", "validation",
                 "--save-grid", str(tmp_path / "grid.png"), "--grid-images", "8"]) == 0  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 70 and 0 < metrics["codes_used"] <= 32 and metrics["psnr"] > 5
    assert Image.open(tmp_path / "grid.png").size == (16 * 32, 2 * 32)


@pytest.mark.usefixtures("one_thread")
def test_image_train_stopped_by_sigterm_continues_when_run_again(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM mid-run (a job limit's `timeout -s TERM`): exit 143 with the resume file beside --out and no --out;
    the same command again finishes the run, writes --out and removes the file."""
    import signal

    from mom.tokenization.image import VQModel

    out = tmp_path / "tok"
    train = ["image", "train", "--recipe", _tiny_vq_recipe(tmp_path, str(RAW_IMAGES), limit=30, steps=4), "--out",
             str(out)]
    forward = VQModel.forward

    def forward_then_sigterm(self, x):
        signal.raise_signal(signal.SIGTERM)  # handled by the loop: it finishes this step, then stops
        return forward(self, x)

    with monkeypatch.context() as m:
        m.setattr(VQModel, "forward", forward_then_sigterm)
        assert main(train) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"stopped (SIGTERM) at step 1 of 4: its state is in {tmp_path / 'tok.resume.pt'}" in err
    assert "run the same command again" in err and not out.exists() and (tmp_path / "tok.resume.pt").exists()
    assert main(train) == 0
    assert json.loads((out / "training_report.json").read_text())["steps"] == 4
    assert not (tmp_path / "tok.resume.pt").exists()


def test_speech_train_eval_decode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A tiny recipe over 40 committed clips keeps the CLI test fast.
    for i, line in enumerate((CLIPS / "transcripts.jsonl").read_text().splitlines()[:40]):
        entry = json.loads(line)
        waveform, sr = read_audio(CLIPS / entry["file"])
        write_audio(tmp_path / "clips" / f"{i}.wav", waveform, sr)
        (tmp_path / "clips" / f"{i}.txt").write_text(entry["transcript"])
    recipe = f"""tokenizer: {{num_units: 16}}
train_data: {{source: folder, options: {{path: {tmp_path / 'clips'}}}}}
kmeans: {{iters: 5}}
"""
    (tmp_path / "r.yaml").write_text(recipe)
    out = tmp_path / "tok"
    assert main(["speech", "train", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
    assert "units/s" in capsys.readouterr().out
    assert SpeechTokenizer.load(out).vocab_size == 16
    assert main(["speech", "train", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["speech", "eval", "--tokenizer", str(out), "--data", str(tmp_path / "clips"), "--split", "all"]) == 0
    assert "codebook usage" in capsys.readouterr().out
    assert main(["speech", "eval", "--tokenizer", str(out), "--data", str(tmp_path / "clips")]) == 2  # no validation
    assert "no clips found" in capsys.readouterr().err
    assert main(["speech", "decode", "--tokenizer", str(out), "--audio", str(tmp_path / "clips" / "0.wav"),
                 "--out", str(tmp_path / "back.wav")]) == 0  # fmt: skip
    back, sr = read_audio(tmp_path / "back.wav")
    original, _ = read_audio(tmp_path / "clips" / "0.wav")
    assert sr == 16000 and abs(len(back) - len(original)) <= 320


@pytest.mark.usefixtures("one_thread")
def test_vae_train_eval_encode_decode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    recipe = {
        "sources": [{"source": "folder", "options": {"path": "unused", "limit": 40, "seed": 0}}],
        "vae": {"base_width": 8, "width_mult": [1, 1, 2]},
        "training": {"steps": 3, "batch_size": 4, "warmup_steps": 1},
        "held_out_fraction": 0.2,
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    out = tmp_path / "vae"
    train = ["vae", "train", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out)]
    assert main([*train, "--opt", f"folder.path={RAW_IMAGES}"]) == 0  # --opt overrides a source option
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 3 and report["held_out_images"] + report["train_images"] == 40
    assert "PSNR" in capsys.readouterr().out
    assert main([*train, "--opt", f"folder.path={RAW_IMAGES}"]) == 2  # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    assert main(["vae", "eval", "--vae", str(out), "--images", str(RAW_IMAGES), "--split", "validation",
                 "--save-grid", str(tmp_path / "grid.png"), "--grid-images", "8"]) == 0  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 70 and metrics["psnr"] > 5
    assert Image.open(tmp_path / "grid.png").size == (16 * 32, 2 * 32)

    pngs = sorted(RAW_IMAGES.glob("digits-*.png"))[:2]
    Image.open(pngs[1]).resize((48, 48)).save(tmp_path / "big.png")  # resized to 32x32 on encoding
    latents = tmp_path / "z.npy"
    encode = ["vae", "encode", "--vae", str(out), "--out"]
    assert main([*encode, str(latents), str(pngs[0]), str(tmp_path / "big.png")]) == 0
    captured = capsys.readouterr()
    assert "(2, 4, 8, 8)" in captured.out and "resized to 32x32" in captured.err
    z = np.load(latents)
    assert z.shape == (2, 4, 8, 8) and z.dtype == np.float32
    assert main(["vae", "decode", "--vae", str(out), "--latents", str(latents), "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["0000.png", "0001.png"]
    decoded = Image.open(tmp_path / "png" / "0000.png")
    assert decoded.size == (32, 32) and decoded.mode == "RGB"

    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), np.float32))  # 3 latent channels, the VAE has 4
    assert main(["vae", "decode", "--vae", str(out), "--latents", str(tmp_path / "bad.npy"),
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latents: expected shape (n, 4, 8, 8)" in err and not (tmp_path / "bad").exists()
    (tmp_path / "text.png").write_text("not an image")
    assert main([*encode, str(tmp_path / "t.npy"), str(tmp_path / "text.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text.png: not a readable image" in err and not (tmp_path / "t.npy").exists()
    assert main(["vae", "eval", "--vae", str(tmp_path / "absent"), "--images", str(RAW_IMAGES)]) == 2
    assert "absent/config.json" in capsys.readouterr().err


def test_vae_train_names_the_bad_recipe_field_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = {"sources": [{"source": "folder", "options": {"path": str(RAW_IMAGES)}}], "vae": {"base_widht": 8}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["vae", "train", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "vae")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'r.yaml'}: vae.base_widht: unknown key" in err
    assert not (tmp_path / "vae").exists()


def test_a_device_the_machine_lacks_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "tok"
    recipe = _tiny_vq_recipe(tmp_path, str(RAW_IMAGES), limit=10, steps=1)
    small, images = ROOT / "tokenizers" / "small", str(RAW_IMAGES)
    for argv in (["image", "train", "--recipe", recipe, "--out", str(out), "--device", "cuda"],
                 ["image", "eval", "--tokenizer", str(small / "image"), "--images", images, "--device", "cuda"],
                 ["vae", "eval", "--vae", str(small / "vae"), "--images", images, "--device", "cuda:0"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mom-tokenizer: error: --device cuda") and \
            "no CUDA device is available here" in err, err
    (tmp_path / "r2.yaml").write_text(Path(recipe).read_text().replace('"warmup_steps": 1', '"warmup_steps": 1, '
                                                                       '"device": "gpu"'))
    assert main(["image", "train", "--recipe", str(tmp_path / "r2.yaml"), "--out", str(out)]) == 2
    assert "r2.yaml: training.device gpu: not a device" in capsys.readouterr().err
    assert not out.exists()
