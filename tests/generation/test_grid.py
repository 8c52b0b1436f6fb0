"""`mom.generation.grid`: the sheet's layout (cells where they belong, one caption strip per row), captions drawn or
written beside the PNG, and the checks of the cells and of the path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mom.generation.grid import captions_path, check_grid_path, grid_image, sample_rows, save_grid


def cells(rows: int, cols: int, size: int = 8) -> list[list[np.ndarray]]:
    """Cell (r, c) is filled with the value 10 * (r * cols + c) + 5: each one tells where it came from."""
    return [[np.full((size, size, 3), 10 * (r * cols + c) + 5, np.uint8) for c in range(cols)] for r in range(rows)]


def test_cells_are_placed_row_by_row_without_captions(tmp_path: Path) -> None:
    assert save_grid(tmp_path / "g.png", cells(2, 3)) == [tmp_path / "g.png"]
    sheet = np.asarray(Image.open(tmp_path / "g.png"))
    assert sheet.shape == (2 * 8, 3 * 8, 3)
    for r in range(2):
        for c in range(3):
            assert (sheet[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] == 10 * (r * 3 + c) + 5).all()


def test_grey_cells_missing_cells_and_a_minimum_width() -> None:
    grey = np.full((4, 4), 7, np.uint8)
    sheet = np.asarray(grid_image([[grey, None], [grey[..., None]]], columns=3))
    assert sheet.shape == (8, 12, 3)
    assert (sheet[:4, :4] == 7).all() and (sheet[4:, :4] == 7).all()
    assert (sheet[:4, 4:] == 255).all() and (sheet[4:, 4:] == 255).all()  # missing cells and padding are white


def test_captions_are_drawn_under_their_rows(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    captions_path(path).write_text("from an earlier grid whose captions could not be drawn")
    written = save_grid(path, cells(2, 2, size=16), captions=["a red seven", "a smiling face with very long words"])
    assert written == [path] and not captions_path(path).exists()
    sheet = np.asarray(Image.open(path))
    strip = sheet.shape[0] // 2 - 16
    assert strip > 0 and sheet.shape == (2 * (16 + strip), 32, 3)
    for r in range(2):
        top = r * (16 + strip)
        assert (sheet[top : top + 16, :16] == 10 * (2 * r) + 5).all()  # the cells stay where they are
        assert (sheet[top + 16 : top + 16 + strip] < 128).any()  # dark text on the white strip under row r


def test_captions_the_font_cannot_draw_go_beside_the_png(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    written = save_grid(path, cells(2, 2), captions=["a red seven", "一只猫"])
    assert written == [path, tmp_path / "g.captions.txt"]
    assert Image.open(path).size == (2 * 8, 2 * 8)  # no caption strips
    assert captions_path(path).read_text(encoding="utf-8") == "row 1: a red seven\nrow 2: 一只猫\n"


def test_bad_cells_are_refused() -> None:
    with pytest.raises(ValueError, match="one size"):
        grid_image([[np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)]])
    with pytest.raises(ValueError, match="expected uint8"):
        grid_image([[np.zeros((4, 4, 3), np.float32)]])
    with pytest.raises(ValueError, match="2 captions for 1 rows"):
        grid_image(cells(1, 1), captions=["a", "b"])


def test_check_grid_path_says_why_a_path_is_unusable(tmp_path: Path) -> None:
    assert check_grid_path(tmp_path / "g.png") == tmp_path / "g.png"
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind
    with pytest.raises(ValueError, match="must name a .png file"):
        check_grid_path(tmp_path / "g.jpg")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        check_grid_path(tmp_path / "d.png")
    with pytest.raises(FileNotFoundError, match="no directory"):
        check_grid_path(tmp_path / "absent" / "g.png")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="no directory"):
        check_grid_path(tmp_path / "file" / "g.png")


def test_sample_rows_is_prompts_by_seeds() -> None:
    rows = sample_rows(lambda prompt, seed: f"{prompt}{seed}", ["a", "b"], range(3, 5))
    assert rows == [["a3", "a4"], ["b3", "b4"]]
