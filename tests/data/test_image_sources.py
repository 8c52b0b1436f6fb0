"""Tests of mom.data.images: captioned image sources, augmentation, export, and the committed raw image set."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mom.data.images import DIGIT_WORDS, NOTO_FONT, augment_image, export_images, iter_image_records
from mom.utils.errors import BadInputError, MissingDependencyError

REPO = Path(__file__).resolve().parents[2]
RAW_IMAGES = REPO / "data" / "small" / "raw" / "images"


def _collect(source: str, **options) -> tuple[list, list[BadInputError]]:
    errors: list[BadInputError] = []
    records = list(iter_image_records(source, on_error=errors.append, **options))
    return records, errors


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    Image.new("RGB", size, colour).save(path)


def test_folder_sidecars_skip_corrupt_image_and_bad_captions(tmp_path: Path) -> None:
    _png(tmp_path / "good.png", (255, 0, 0))
    (tmp_path / "good.txt").write_text("  a red\nrectangle ")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "corrupt.txt").write_text("a broken file")
    _png(tmp_path / "empty.png", (0, 255, 0))
    (tmp_path / "empty.txt").write_text("   \n")
    _png(tmp_path / "nocaption.png", (0, 0, 255))

    records, errors = _collect("folder", path=str(tmp_path), size=16)

    assert [r.caption for r in records] == ["a red rectangle"]  # whitespace normalised
    assert records[0].image.mode == "RGB" and records[0].image.size == (16, 16)
    assert records[0].source == "folder" and records[0].meta["id"] == "good"
    assert np.asarray(records[0].image)[8, 8].tolist() == [255, 0, 0]
    bad = {Path(e.path).name: e.reason for e in errors}
    assert set(bad) == {"corrupt.png", "empty.txt", "nocaption.png"}
    assert "cannot read image" in bad["corrupt.png"]
    assert "empty caption" in bad["empty.txt"]
    assert "nocaption.txt" in bad["nocaption.png"]


def test_folder_captions_jsonl_errors_meta_and_stop(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (10, 20, 30))
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    lines = [
        {"file": "a.png", "caption": "a dark square", "source": "openmoji", "split": "validation", "id": "X1"},
        {"file": "missing.png", "caption": "nothing"},
        {"file": "a.png", "caption": ""},
        {"file": "clear.png", "caption": "a transparent square"},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n{not json\n" + "\n".join(json.dumps(x) for x in lines[2:])
    (tmp_path / "captions.jsonl").write_text(text + "\n")

    records, errors = _collect("folder", path=str(tmp_path))

    assert [r.caption for r in records] == ["a dark square", "a transparent square"]
    assert records[0].source == "openmoji"  # the jsonl's source names the origin of a re-exported image
    assert records[0].meta["split"] == "validation" and records[0].meta["id"] == "X1"
    assert records[1].image.getpixel((0, 0)) == (255, 255, 255)  # transparency composited onto white
    reasons = sorted(e.reason.split(" (")[0] for e in errors)
    assert reasons == ["bad captions line", "cannot read image", "empty caption"]
    assert any(e.path.endswith("captions.jsonl:3") for e in errors)

    def stop(err: BadInputError) -> None:
        raise err

    with pytest.raises(BadInputError, match="missing.png"):
        list(iter_image_records("folder", on_error=stop, path=str(tmp_path)))


def test_unknown_source_and_option_are_named() -> None:
    with pytest.raises(ValueError, match="'flickr'"):
        _collect("flickr")
    with pytest.raises(ValueError, match="colour_mode"):
        _collect("digits", colour_mode=True)
    with pytest.raises(ValueError, match="path"):
        _collect("folder")


def test_digits_records_and_deterministic_augmentation() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install scikit-learn)")
    records, errors = _collect("digits", size=32, limit=4, seed=3, augment=2, augment_seed=7)
    assert not errors and len(records) == 12  # 4 digits x (original + 2 variants)
    for r in records:
        assert r.source == "digits" and r.image.mode == "RGB" and r.image.size == (32, 32)
        m = re.fullmatch(r"a handwritten digit (\w+) in (\w+)", r.caption)
        assert m and DIGIT_WORDS.index(m.group(1)) == r.meta["label"] and m.group(2) == r.meta["ink"]
    assert [r.meta["variant"] for r in records[:3]] == [0, 1, 2]
    assert len({r.meta["id"] for r in records}) == 4
    original, variant = np.asarray(records[0].image), np.asarray(records[1].image)
    assert not np.array_equal(original, variant)
    again, _ = _collect("digits", size=32, limit=4, seed=3, augment=2, augment_seed=7)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(records, again))
    other, _ = _collect("digits", size=32, limit=4, seed=3, augment=2, augment_seed=8)
    assert not np.array_equal(np.asarray(records[1].image), np.asarray(other[1].image))
    assert records[0].caption == other[0].caption  # same sample: seed picks it, augment_seed does not


def test_augment_image_keeps_size_and_respects_flip() -> None:
    import random

    image = Image.new("RGB", (32, 32), (255, 255, 255))
    image.paste((200, 0, 0), (0, 0, 12, 32))  # red bar on the left, wider than any crop can cut off (25%)

    def bar_on_left(out: np.ndarray) -> bool:
        return out[:, :4, 1].mean() < out[:, -4:, 1].mean()  # green is 0 in the bar, 255 on white

    for i in range(20):
        out = np.asarray(augment_image(image, random.Random(i), flip=False))
        assert out.shape == (32, 32, 3) and bar_on_left(out)
    on_left = [bar_on_left(np.asarray(augment_image(image, random.Random(i)))) for i in range(20)]
    assert any(on_left) and not all(on_left)  # mirrored about half the time


def test_export_roundtrip_and_refuses_to_overwrite(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install scikit-learn)")
    out = tmp_path / "raw"
    summary = export_images(out, [("digits", 20, {})], size=16, held_out=0.25, seed=1)
    assert summary["per_source_split"] == {"digits/train": 15, "digits/validation": 5}
    records, errors = _collect("folder", path=str(out))
    assert not errors and len(records) == 20
    assert {r.source for r in records} == {"digits"} and all(r.image.size == (16, 16) for r in records)
    assert sum(r.meta["split"] == "validation" for r in records) == 5
    with pytest.raises(FileExistsError):
        export_images(out, [("digits", 2, {})], size=16)
    assert len(list(out.glob("*.png"))) == 20  # untouched
    export_images(out, [("digits", 2, {})], size=16, overwrite=True)
    assert len(list(out.glob("*.png"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary folder left behind


def test_export_of_a_source_whose_records_name_their_own_file(tmp_path: Path) -> None:
    """A source's own ``meta["file"]`` (the folder source, Open Clip Art's SVG path) is kept as ``source_file``:
    it once overwrote the exported PNG's name, and reading the export back skipped every such image."""
    out = tmp_path / "again"
    summary = export_images(out, [("folder", 12, {"path": str(RAW_IMAGES)})], size=16, held_out=0.25, seed=0)
    assert sum(summary["per_source_split"].values()) == 12 and not summary["skipped"]
    lines = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert all((out / line["file"]).is_file() and (RAW_IMAGES / line["source_file"]).is_file() for line in lines)
    records, errors = _collect("folder", path=str(out))
    assert not errors and len(records) == 12


def test_openmoji_missing_package_names_npm(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match="npm pack openmoji"):
        _collect("openmoji", path=str(tmp_path))
    with pytest.raises(MissingDependencyError, match="npm"):
        _collect("openmoji")


def _openmoji_dir() -> str | None:
    for candidate in (os.environ.get("MOM_OPENMOJI_PATH"), str(REPO / "node_modules" / "openmoji")):
        if candidate and (Path(candidate) / "data" / "openmoji.json").is_file():
            return candidate
    return None


@pytest.mark.skipif(_openmoji_dir() is None, reason="openmoji npm package not found (set MOM_OPENMOJI_PATH)")
def test_openmoji_records() -> None:
    try:
        records, errors = _collect("openmoji", path=_openmoji_dir(), size=24, limit=6, seed=0)
    except MissingDependencyError as err:
        pytest.skip(str(err))
    assert not errors and len(records) == 6
    for r in records:
        assert r.image.size == (24, 24) and r.image.mode == "RGB" and r.meta["license"] == "CC BY-SA 4.0"
        assert " emoji" in r.caption and r.meta["hexcode"] == r.meta["id"]
        assert np.asarray(r.image).std() > 5  # something was drawn


@pytest.mark.skipif(not Path(NOTO_FONT).is_file(), reason="apt-get install fonts-noto-color-emoji")
def test_noto_emoji_records() -> None:
    records, errors = _collect("noto-emoji", size=32, limit=5, seed=1)
    assert not errors and len(records) == 5
    for r in records:
        char = chr(int(r.meta["codepoint"][2:], 16))
        assert r.caption == f"{unicodedata.name(char).lower()}, an emoji"
        assert np.asarray(r.image).std() > 5


def test_noto_missing_font_names_apt_package(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match="fonts-noto-color-emoji"):
        _collect("noto-emoji", font=str(tmp_path / "none.ttf"))


def test_hf_dataset_from_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    images = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    ds = datasets.Dataset.from_dict(
        {"img": images, "text": ["red", "", "blue"]}, features=datasets.Features(
            {"img": datasets.Image(), "text": datasets.Value("string")}
        )
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "ds"))
    records, errors = _collect("hf-dataset", path=str(tmp_path / "ds"), image_column="img", caption_column="text")
    assert [r.caption for r in records] == ["red", "blue"]
    assert np.asarray(records[1].image)[0, 0].tolist() == [0, 0, 255]
    assert len(errors) == 1 and errors[0].reason == "empty caption"
    with pytest.raises(ValueError, match="caption_column='caption'"):
        _collect("hf-dataset", path=str(tmp_path / "ds"), image_column="img")


def test_committed_raw_image_set() -> None:
    lines = [json.loads(x) for x in (RAW_IMAGES / "captions.jsonl").read_text().splitlines()]
    assert 300 <= len(lines) <= 1000
    total = sum(p.stat().st_size for p in RAW_IMAGES.iterdir())
    assert total <= 2 * 1024 * 1024
    by_source: dict[str, list[str]] = {}
    for line in lines:
        assert line["caption"].strip() and line["split"] in ("train", "validation")
        by_source.setdefault(line["source"], []).append(line["split"])
    assert set(by_source) == {"openmoji", "noto-emoji", "digits"}
    for splits in by_source.values():
        assert 0.05 <= splits.count("validation") / len(splits) <= 0.15
    assert len({line["file"] for line in lines}) == len(lines) == len(list(RAW_IMAGES.glob("*.png")))
    with Image.open(RAW_IMAGES / lines[0]["file"]) as im:
        assert im.mode == "RGB" and im.size == (32, 32)


# ---- medium corpus drawings: Tux Paint stamps, Open Clip Art (committed samples in tests/data/fixtures) -----------
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _has_rasterizer() -> bool:
    import importlib.util

    return importlib.util.find_spec("resvg_py") is not None or importlib.util.find_spec("cairosvg") is not None


def test_tuxpaint_drawing_with_its_description_padded_and_bad_stamps_counted() -> None:
    records, errors = _collect("tuxpaint", path=str(FIXTURES / "tuxpaint"), size=32, augment=2)
    koala = [r for r in records if r.meta["id"] == "animals/marsupials/koala"]
    assert [r.meta["variant"] for r in koala] == [0, 1, 2] and len(records) == 3
    assert koala[0].caption == "A koala." and koala[0].meta["category"] == "animals/marsupials"
    pixels = np.asarray(koala[0].image)
    # the 35x48 drawing is centred on a white 48x48 square (padded, not cropped): its side columns are white
    assert pixels.shape == (32, 32, 3) and (pixels[:, [0, -1]] >= 245).all() and (pixels[:, 12:20] < 200).any()
    reasons = sorted((Path(e.path).name, e.reason.split(" (")[0]) for e in errors)
    assert reasons == [("corrupt.png", "cannot read image"), ("latin1.txt", "cannot read the description as UTF-8")]


def test_tuxpaint_noflip_stamps_are_never_mirrored() -> None:
    from mom.data.tuxpaint import list_stamps

    stamps = {s.key: s for s in list_stamps(FIXTURES / "tuxpaint")}
    assert stamps["animals/marsupials/koala"].flip_ok is False  # koala.dat says noflip
    assert set(stamps["animals/marsupials/koala"].recordings) == {"en", "fr", "nl"}
    assert stamps["animals/marsupials/koala"].descriptions["fr"] == "Un koala."


@pytest.mark.skipif(not _has_rasterizer(), reason="no SVG rasteriser (pip install resvg-py)")
def test_openclipart_captions_from_svg_metadata_and_bad_svgs_counted() -> None:
    root = FIXTURES / "openclipart"
    records, errors = _collect("openclipart", path=str(root), png_path=str(root / "no-pngs"), size=24)
    captions = {r.meta["id"]: r.caption for r in records}
    assert captions["shapes/arrows/cursor_arrow_martin_koz__02"].startswith(
        "Cursor Arrow. Cursor arrow derived from standard system cursor arrow."
    )
    assert captions["shapes/arrows/cursor_arrow_martin_koz__02"].endswith("clip art of shapes, arrows")
    assert captions["shapes/arrows/direction_suivre_4_yves__01"].startswith("direction à suivre 4. lutte incendie")
    assert all(r.image.size == (24, 24) and r.meta["license"] == "public domain" for r in records)
    reasons = sorted((e.path.rsplit("/", 1)[-1], e.reason.split(" (")[0]) for e in errors)
    assert reasons == [("truncated.svg", "cannot rasterise SVG"), ("untitled", "empty caption")]


def test_openclipart_caption_rules() -> None:
    from mom.data.openclipart import clipart_caption, svg_metadata

    meta = svg_metadata(
        "<dc:title>Red  Apple</dc:title><dc:description>A &amp;quot;shiny&amp;quot; apple</dc:description>"
        "<dc:subject><rdf:Bag><rdf:li>apple</rdf:li><rdf:li>fruit</rdf:li><rdf:li></rdf:li></rdf:Bag></dc:subject>"
    )
    assert meta == {"title": "Red Apple", "description": 'A "shiny" apple', "keywords": ["apple", "fruit"]}
    assert clipart_caption(meta, "food/fruit") == 'Red Apple. A "shiny" apple (fruit), clip art of food, fruit'
    assert clipart_caption({**meta, "title": ""}, "food") == ""


def test_drawing_sources_name_the_missing_package(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match="tuxpaint-stamps-default"):
        _collect("tuxpaint", path=str(tmp_path / "none"))
    with pytest.raises(MissingDependencyError, match="openclipart-svg"):
        _collect("openclipart", path=str(tmp_path / "none"))
