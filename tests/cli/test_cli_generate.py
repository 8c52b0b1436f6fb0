"""`mom-generate`: a decoded document from a model directory or a run directory; warnings and one-line errors."""

import shutil
import wave
from pathlib import Path

import pytest
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
