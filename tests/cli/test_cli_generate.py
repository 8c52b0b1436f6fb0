"""`mom-generate`: a decoded document from a model directory or a run directory, grids of samples; warnings and
one-line errors."""

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mom
from mom.cli import generate
from mom.cli.generate import main
from mom.tokenization.multimodal import MultimodalTokenizer

TOKENIZERS = Path(__file__).resolve().parents[2] / "tokenizers" / "small"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A mom-train-like run directory: the tiny model's export in hf/ with its tokenizer."""
    tokenizer = MultimodalTokenizer.load(TOKENIZERS)
    config = mom.MoMConfig(**tokenizer.to_config_kwargs(), d_model=32, n_layer=2)
    run = tmp_path_factory.mktemp("run")
    mom.MoMForCausalLM(config).save_pretrained(run / "hf")
    shutil.copytree(TOKENIZERS, run / "hf" / "tokenizer")
    return run


def one_error_line(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("mom-generate: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_writes_a_decoded_document(tmp_path, run_dir, capsys):
    out = tmp_path / "img"
    assert main(["--model", str(run_dir / "hf"), "--prompt", "a grinning face", "--then", "image", "--out", str(out),
                 "--max-new-tokens", "70"]) == 0
    assert Image.open(out / "image_0.png").size == (32, 32)
    assert (out / "text.txt").read_text().startswith("a grinning face[image_0.png]")
    assert "wrote" in capsys.readouterr().out


def test_a_run_directory_uses_its_hf_export_and_replaces_stale_files(tmp_path, run_dir, capsys):
    out = tmp_path / "speech"
    out.mkdir()
    (out / "speech_7.wav").write_text("from an earlier run")
    assert main(["--model", str(run_dir), "--then", "speech", "--max-speech-units", "25", "--max-new-tokens", "30",
                 "--out", str(out)]) == 0
    with wave.open(str(out / "speech_0.wav")) as w:
        seconds = w.getnframes() / w.getframerate()
    assert 0.02 <= seconds <= 25 / 50 + 0.05  # at most 25 units at 50 units/s
    assert not (out / "speech_7.wav").exists()
    assert "wrote" in capsys.readouterr().out


def test_a_near_silent_clip_is_warned_about(tmp_path, run_dir, capsys, monkeypatch):
    monkeypatch.setattr(generate, "QUIET_DBFS", 0.0)  # every clip is below full scale: the warning must show
    assert main(["--model", str(run_dir), "--then", "speech", "--max-speech-units", "10", "--max-new-tokens", "15",
                 "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "mom-generate: warning: speech_0.wav is near-silent" in err and "dBFS RMS" in err


def test_bad_inputs_are_one_line_errors(tmp_path, run_dir, capsys):
    assert main(["--model", str(tmp_path / "nowhere")]) == 2
    one_error_line(capsys, "no config.json", "runs/tiny_mom/hf")
    (tmp_path / "run").mkdir()
    assert main(["--model", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "no hf/ export yet")
    assert main(["--model", str(run_dir), "--tokenizer", str(tmp_path / "none")]) == 2
    one_error_line(capsys, "no multimodal tokenizer", "--tokenizer")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(run_dir), "--then", "video"])
    assert e.value.code == 2 and "invalid choice: 'video'" in capsys.readouterr().err


def cell(sheet, r: int, c: int, size: int, row_height: int):
    return sheet[r * row_height : r * row_height + size, c * size : (c + 1) * size]


def test_a_grid_of_samples_per_prompt_and_seed(tmp_path, run_dir, capsys):
    grid = tmp_path / "grid.png"
    assert main(["--model", str(run_dir), "--prompt", "a grinning face", "--prompt", "a handwritten digit seven",
                 "--then", "image", "--num-samples", "3", "--seed", "5", "--grid", str(grid),
                 "--out", str(tmp_path / "unused")]) == 0  # fmt: skip
    assert "grid of 2 prompt(s) x 3 sample(s) (seeds 5..7)" in capsys.readouterr().out
    assert not (tmp_path / "unused").exists() and not (tmp_path / "grid.captions.txt").exists()
    sheet = np.asarray(Image.open(grid))
    row_height = sheet.shape[0] // 2
    assert sheet.shape[1] == 3 * 32 and row_height > 32  # 3 columns of 32x32 images, each row's prompt under it
    cells = [[cell(sheet, r, c, 32, row_height) for c in range(3)] for r in range(2)]
    for row in cells:  # each seed gives its own sample
        assert not any(np.array_equal(row[a], row[b]) for a, b in [(0, 1), (0, 2), (1, 2)])
    # a cell is the image that one document with that prompt and seed starts with
    one = tmp_path / "one"
    assert main(["--model", str(run_dir), "--prompt", "a handwritten digit seven", "--then", "image", "--seed", "6",
                 "--max-new-tokens", "70", "--out", str(one)]) == 0  # fmt: skip
    assert np.array_equal(cells[1][1], np.asarray(Image.open(one / "image_0.png")))


def test_a_prompt_the_font_cannot_draw_goes_to_a_captions_file(tmp_path, run_dir, capsys):
    grid = tmp_path / "grid.png"
    assert main(["--model", str(run_dir), "--prompt", "一只猫", "--then", "image", "--num-samples", "2",
                 "--grid", str(grid)]) == 0  # fmt: skip
    assert Image.open(grid).size == (2 * 32, 1 * 32)  # rows x cols x image size, no caption strip
    assert (tmp_path / "grid.captions.txt").read_text(encoding="utf-8") == "row 1: 一只猫\n"
    assert f"wrote {tmp_path / 'grid.captions.txt'}" in capsys.readouterr().out


def test_bad_grid_options_are_one_line_errors(tmp_path, run_dir, capsys):
    image = ["--model", str(run_dir), "--then", "image"]
    assert main([*image, "--num-samples", "0", "--grid", str(tmp_path / "g.png")]) == 2
    one_error_line(capsys, "--num-samples: must be >= 1, got 0")
    assert main([*image, "--num-samples", "2"]) == 2
    one_error_line(capsys, "pass --grid FILE.png")
    assert main([*image, "--prompt", "a", "--prompt", "b", "--out", str(tmp_path / "doc")]) == 2
    one_error_line(capsys, "2 --prompt", "pass --grid FILE.png")
    assert main([*image, "--grid", str(tmp_path / "absent" / "g.png")]) == 2
    one_error_line(capsys, "--grid", "no directory")
    (tmp_path / "d.png").mkdir()
    assert main([*image, "--grid", str(tmp_path / "d.png")]) == 2
    one_error_line(capsys, "is a directory")
    assert main([*image, "--grid", str(tmp_path / "g.jpg")]) == 2
    one_error_line(capsys, "must name a .png file")
    assert main(["--model", str(run_dir), "--then", "speech", "--grid", str(tmp_path / "g.png")]) == 2
    one_error_line(capsys, "--grid: draws images; pass --then image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]  # nothing written


def test_a_text_and_image_model_with_a_three_modality_tokenizer(tmp_path, capsys):
    """A model trained on a text + image corpus that a text + image + speech tokenizer built (as the medium
    Chameleon-like corpus): its tokenizer's leading part serves it; speech is refused, not sampled out of range."""
    tokenizer = MultimodalTokenizer.load(TOKENIZERS).for_model(("text", "image"), (2048, 512))
    config = mom.MoMConfig(**tokenizer.to_config_kwargs(), d_model=32, n_layer=2)
    mom.MoMForCausalLM(config).save_pretrained(tmp_path / "ti")
    grid = tmp_path / "grid.png"
    common = ["--model", str(tmp_path / "ti"), "--tokenizer", str(TOKENIZERS)]
    assert main([*common, "--then", "image", "--num-samples", "2", "--grid", str(grid)]) == 0
    assert Image.open(grid).size == (2 * 32, 32)
    out = tmp_path / "doc"
    assert main([*common, "--temperature", "2", "--max-new-tokens", "60", "--out", str(out)]) == 0
    assert (out / "text.txt").is_file() and not list(out.glob("speech_*"))  # no <speech> opener in its text
    capsys.readouterr()
    assert main([*common, "--then", "speech"]) == 2
    one_error_line(capsys, "--then speech: the model has no speech", "['text', 'image']")
    other = mom.MoMConfig(modalities=("text", "image"), vocab_sizes=(2048, 100), d_model=32, n_layer=2)
    mom.MoMForCausalLM(other).save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "other"), "--tokenizer", str(TOKENIZERS), "--out", str(out)]) == 2
    one_error_line(capsys, "do not start with the model's ['text', 'image'] / [2048, 100]",
                   "pass the model's --tokenizer")


def test_a_bad_device_is_a_one_line_error(tmp_path, run_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bad, needle in [("cuda", "no CUDA device is available here"), ("tpu", "not a device")]:
        assert main(["--model", str(run_dir), "--device", bad, "--out", str(tmp_path / "x")]) == 2
        one_error_line(capsys, f"--device {bad}: ", needle)
    assert not (tmp_path / "x").exists()
