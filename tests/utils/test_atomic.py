"""The one atomic writer: a write interrupted midway leaves the old file (or directory) intact and no temp behind."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from mom.utils.atomic import atomic_directory, atomic_file, atomic_save, atomic_write_bytes, atomic_write_text


class Boom(Exception):
    pass


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_and_bytes_replace_the_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "config.json"
    atomic_write_text(target, "é ünïcode\n")  # parent directories are created
    assert target.read_bytes() == "é ünïcode\n".encode()  # UTF-8 whatever the locale
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # shared, not mkstemp's private 0600
    assert _entries(target.parent) == ["config.json"]


def test_failure_mid_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_file(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half of the new cont")
            raise Boom
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["manifest.json"]


def test_failure_of_a_writer_function_leaves_no_file(tmp_path: Path) -> None:
    def write(path: Path) -> None:
        path.write_text(json.dumps({"partial": True}))
        raise Boom

    with pytest.raises(Boom):
        atomic_save(tmp_path / "weights.bin", write)
    assert _entries(tmp_path) == []
    atomic_save(tmp_path / "weights.bin", lambda path: path.write_bytes(b"whole"))
    assert (tmp_path / "weights.bin").read_bytes() == b"whole"


def test_interrupt_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and _entries(tmp_path) == ["a.txt"]


def test_directory_failure_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "tokenizer"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("new")
            raise Boom
    assert _entries(tmp_path) == ["tokenizer"] and _entries(target) == ["config.json"]
    assert (target / "config.json").read_text() == "old"
    with atomic_directory(target) as tmp:
        (tmp / "model.bin").write_bytes(b"x")
    assert _entries(tmp_path) == ["tokenizer"] and _entries(target) == ["model.bin"]  # replaced as a whole
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
