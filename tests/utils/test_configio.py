from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from mom.utils.configio import apply_overrides, blame, from_dict, read_mapping


@dataclass
class Inner:
    name: str
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class Outer:
    inner: Inner
    lr: float = 1.0
    steps: int = 1
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    pair: tuple[float, float] = (0.0, 1.0)
    ids: list[int] = field(default_factory=list)
    extra: Inner | None = None
    free: Any = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")


def test_builds_nested_dataclasses_and_converts():
    o = from_dict(Outer, {"inner": {"name": "x", "weights": {"t": 1}}, "lr": 2, "pair": [1, 2], "ids": (3, 4),
                          "extra": None, "free": {"any": [1]}})  # fmt: skip
    assert o.inner == Inner("x", {"t": 1.0}) and isinstance(o.inner.weights["t"], float)
    assert o.lr == 2.0 and isinstance(o.lr, float)
    assert o.pair == (1.0, 2.0) and o.ids == [3, 4] and o.free == {"any": [1]}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"name": "x"}, "stepz": 1}, r"^cfg\.stepz: unknown key; valid keys are \["),
        ({"inner": {"name": "x", "nam": 1}}, r"^cfg\.inner\.nam: unknown key"),
        ({}, r"^cfg\.inner: required key missing"),
        ({"inner": {"name": "x"}, "steps": True}, r"^cfg\.steps: expected int, got bool True"),
        ({"inner": {"name": "x"}, "flag": 1}, r"^cfg\.flag: expected bool, got int 1"),
        ({"inner": {"name": "x"}, "lr": "1e-3"}, r"^cfg\.lr: expected float, got str '1e-3'"),
        ({"inner": {"name": "x"}, "lr": float("nan")}, r"^cfg\.lr: expected float"),
        ({"inner": {"name": "x"}, "mode": "c"}, r"^cfg\.mode: expected one of 'a', 'b', got str 'c'"),
        ({"inner": {"name": "x"}, "pair": [1]}, r"^cfg\.pair: expected list of 2 float"),
        ({"inner": {"name": "x"}, "ids": [1, "2"]}, r"^cfg\.ids\[1\]: expected int"),
        ({"inner": {"name": "x", "weights": {"t": "w"}}}, r"^cfg\.inner\.weights\.t: expected float"),
        ({"inner": {"name": "x"}, "extra": {"name": 3}}, r"^cfg\.extra\.name: expected str"),
        ({"inner": {"name": "x"}, "extra": 3}, r"^cfg\.extra: expected Inner or null, got int 3"),
        ({"inner": {"name": "x"}, "steps": 0}, r"^cfg\.steps: must be >= 1, got 0"),
        ([1], r"^cfg: expected a mapping, got list"),
    ],
)
def test_errors_name_the_dotted_key(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(Outer, data, "cfg")


def test_hooks():
    with pytest.raises(ValueError, match=r"^unknown key\(s\) \['a', 'b'\]; valid keys are"):
        from_dict(Inner, {"name": "x", "a": 1, "b": 2}, list_unknown=True)
    assert from_dict(Inner, {"name": 5}, check_types=False).name == 5  # the class checks types itself


def test_read_mapping(tmp_path):
    (tmp_path / "r.yaml").write_text("lr: 1e-3\nn: 2\n")
    assert read_mapping(tmp_path / "r.yaml") == {"lr": 0.001, "n": 2}  # YAML 1.2 float, not the string "1e-3"
    (tmp_path / "empty.yaml").write_text("")
    assert read_mapping(tmp_path / "empty.yaml") == {}
    (tmp_path / "c.json").write_text('{"a": [1, 2]}')
    assert read_mapping(tmp_path / "c.json") == {"a": [1, 2]}
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match=r"^recipe .*list\.yaml: must be a mapping of sections, got list"):
        read_mapping(tmp_path / "list.yaml", "recipe", of="sections")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"config .*bad\.json: invalid JSON"):
        read_mapping(tmp_path / "bad.json", "config")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML"):
        read_mapping(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match=r"recipe .*missing\.yaml not found"):
        read_mapping(tmp_path / "missing.yaml", "recipe")


@dataclass
class Section:
    steps: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] | None = None


SCHEMA = {"run": Section, "model": {"width": int, "names": list[str] | Literal["auto"]}}


def test_apply_overrides_sets_parsed_values_and_reports_what_it_set():
    raw = {"run": {"steps": 3}}
    applied = apply_overrides(raw, ["run.steps=5", "run.extra.a.b=1e-3", "model.names=[x, y]", "run.weights.t=2",
                                    "model.names=auto"], SCHEMA)  # fmt: skip
    assert raw == {"run": {"steps": 5, "extra": {"a": {"b": 0.001}}, "weights": {"t": 2}}, "model": {"names": "auto"}}
    assert applied == {"run.steps": "run.steps=5", "run.extra.a.b": "run.extra.a.b=1e-3",
                       "model.names": "model.names=auto", "run.weights.t": "run.weights.t=2"}  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.steps", r"^override 'run\.steps': expected key=value"),
        ("run.stepz=1", r"^override run\.stepz: unknown key; valid keys of run are \['extra', 'steps', 'weights'\]"),
        ("rnu.steps=1", r"^override rnu\.steps: unknown section 'rnu'; valid: \['run', 'model'\]"),
        ("run=1", r"^override run: name a key inside the section"),
        ("run.steps.x=1", r"^override run\.steps\.x: run\.steps is not a mapping"),
        ("run.steps=ten", r"^override run\.steps=ten: expected int, got str 'ten'$"),
        ("run.weights.t=heavy", r"^override run\.weights\.t=heavy: expected float, got str 'heavy'$"),
        ("model.width=[1", r"^override model\.width: cannot parse value"),
        ("model.names=x", r"^override model\.names=x: expected list of str or one of 'auto'"),
        ("frozen.a=1", r"^override frozen\.a: not yours to set$"),
    ],
)
def test_a_bad_override_names_the_override(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides({}, [override], SCHEMA, refused={"frozen": "not yours to set"})


def test_blame_points_at_the_override_that_set_the_key_else_the_file():
    applied = {"run.steps": "run.steps=0", "run.extra.a": "run.extra.a=1"}
    assert str(blame(ValueError("run.steps: must be >= 1, got 0"), applied, "recipe r.yaml")) == (
        "override run.steps=0: must be >= 1, got 0")
    assert str(blame(ValueError("run.extra: bad mapping"), applied, "recipe r.yaml")) == (
        "override run.extra.a=1: bad mapping")  # the override set part of the mapping the error names
    assert str(blame(ValueError("run.lr: must be > 0"), applied, "recipe r.yaml")) == (
        "recipe r.yaml: run.lr: must be > 0")
    assert str(blame(ValueError("run.stepsize: x"), applied, "f")) == "f: run.stepsize: x"  # not a key prefix
