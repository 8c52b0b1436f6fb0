"""Typed configs from YAML / JSON: strict dict -> dataclass conversion and reading a mapping from a file.

    settings = from_dict(MySettings, {"lr": 1e-3, "steps": 10}, where="optim")
    raw = read_mapping("recipes/tiny_mom.yaml", "recipe")
    applied = apply_overrides(raw, ["optim.lr=1e-3"], {"optim": OptimConfig})  # checked against the schema

Every error is a ``ValueError`` naming the dotted key (``optim.steps: expected int, got str 'ten'``). Supported
annotations: ``int`` (not ``bool``), ``float`` (finite; an ``int`` is accepted and converted), ``bool``, ``str``,
``X | None`` / unions, ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``Sequence[X]``, ``dict[K, V]``,
``Literal[...]``, ``Any`` and nested dataclasses.

`apply_overrides` is the one parser of command-line ``key=value`` overrides (recipes, fine-tuning recipes, a saved
model's ``config.json``): an override with an unknown key or a value of the wrong type is reported as the override's
fault, and `blame` words a later validation error about an overridden key the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = ["apply_overrides", "blame", "check_value", "from_dict", "parse_yaml", "read_mapping", "type_name"]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` is a float (YAML 1.2) rather than the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.inf|\.nan)$", re.I),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text parsed with `_Loader` (YAML 1.2 floats such as ``1e-3``)."""
    return yaml.load(text, Loader=_Loader)


def read_mapping(path: str | Path, what: str = "file", of: str = "keys") -> dict[str, Any]:
    """The mapping held by a YAML file (``.json``: a JSON file); an empty YAML file gives ``{}``.

    Errors name ``what`` and the path: ``FileNotFoundError`` if it is missing, ``ValueError`` if it does not
    parse or holds no mapping (``"{what} {path}: must be a mapping of {of}, got list"``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    is_json = path.suffix == ".json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if is_json else parse_yaml(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: invalid {'JSON' if is_json else 'YAML'}: {e}") from e
    raw = {} if raw is None and not is_json else raw
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path}: must be a mapping of {of}, got {type(raw).__name__}")
    return raw


def from_dict(cls: type, data: Any, where: str = "", *, check_types: bool = True, list_unknown: bool = False) -> Any:
    """Dataclass ``cls`` from a parsed mapping; ``where`` is the dotted key of ``data`` (e.g. ``"optim"``).

    Unknown keys, missing required keys and values not fitting the field annotations raise ``ValueError`` naming
    the dotted key; so do ``ValueError``\\ s of ``cls.__post_init__``, prefixed with ``where``. Hooks:
    ``check_types=False`` leaves type checks to ``cls`` itself (which gives its own messages);
    ``list_unknown=True`` reports all unknown keys at once (``unknown key(s) ['a.b', 'a.c']; valid keys are ...``).
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown and list_unknown:
        raise ValueError(f"unknown key(s) {[prefix + str(k) for k in unknown]}; valid keys are {sorted(fields)}")
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key; valid keys are {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if missing:
        raise ValueError(f"{prefix}{missing[0]}: required key missing")
    options = {"check_types": check_types, "list_unknown": list_unknown}
    kwargs = {k: check_value(v, hints[k], prefix + k, **options) if check_types else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        if not where or msg.startswith((prefix, f"{where}:")):
            raise
        name = re.split(r"[.\[:]", msg, maxsplit=1)[0]  # "mixture.text: ..." is about field "mixture"
        raise ValueError(f"{prefix}{msg}" if name in fields else f"{where}: {msg}") from e


def from_file(cls: type, path: str | Path, what: str = "recipe", **options: bool) -> Any:
    """`from_dict` of the mapping in a YAML/JSON file (`read_mapping`); its errors are prefixed with the path."""
    try:
        return from_dict(cls, read_mapping(path, what), **options)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def check_value(value: Any, tp: Any, key: str, **options: bool) -> Any:
    """``value`` checked against annotation ``tp`` (and converted: dataclasses built, ints to float, sequences to
    the annotated list / tuple); ``ValueError`` naming ``key`` if it does not fit. ``options``: see `from_dict`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        for choice in choices:
            try:
                return check_value(value, choice, key, **options)
            except ValueError as e:
                if len(choices) == 1 and not str(e).startswith(f"{key}: "):  # a nested key is wrong: say which
                    raise
        raise _mismatch(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(key, tp, value)
    if origin is Literal:
        if value in args:
            return value
        raise _mismatch(key, tp, value)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key, **options)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _mismatch(key, tp, value)
            return tuple(check_value(v, a, f"{key}[{i}]", **options) for i, (v, a) in enumerate(zip(value, args)))
        items = [check_value(v, args[0] if args else Any, f"{key}[{i}]", **options) for i, v in enumerate(value)]
        return tuple(items) if tuple in (origin, tp) else items if list in (origin, tp) else type(value)(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _mismatch(key, tp, value)
        if not args:
            return dict(value)
        for k in value:
            check_value(k, args[0], f"{key}.{k}", **options)
        return {k: check_value(v, args[1], f"{key}.{k}", **options) for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _mismatch(key, tp, value)
    if tp is int and isinstance(value, bool):
        raise _mismatch(key, tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _mismatch(key, tp, value)
    raise ValueError(f"{key}: unsupported field type {tp}")  # a programming error, not a user one


def apply_overrides(
    raw: dict[str, Any], overrides: Sequence[str], schema: dict[str, Any], refused: dict[str, str] | None = None
) -> dict[str, str]:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to ``raw`` in place; return {key: override}.

    ``schema`` maps each top-level section to a dataclass or to a mapping {key: annotation}; the key must exist
    (below a free-form ``dict`` annotation any key may be added) and the value must fit its annotation, else a
    ``ValueError`` names the override. ``refused``: {section: why it cannot be overridden}.
    """
    applied: dict[str, str] = {}
    for override in overrides:
        key, value = _parse_override(override, schema, refused or {})
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {key}: {part} is not a mapping in the file")
            node = child
        node[parts[-1]] = value
        applied[key] = override
    return applied


def blame(error: ValueError, applied: dict[str, str], source: str) -> ValueError:
    """The validation ``error`` ("dotted.key: problem") blamed on the override that set that key, else on ``source``
    (e.g. ``"recipe recipes/tiny_mom.yaml"``)."""
    msg = str(error)
    named = re.split(r"[:\[ ]", msg, maxsplit=1)[0]
    for key, override in applied.items():
        if named == key or named.startswith(key + ".") or key.startswith(named + "."):
            return ValueError(f"override {override}: {msg.removeprefix(named).lstrip(': ')}")
    return ValueError(f"{source}: {msg}")


def _parse_override(override: str, schema: dict[str, Any], refused: dict[str, str]) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {override!r}: expected key=value, e.g. train.max_steps=20")
    parts = key.split(".")
    if parts[0] in refused:
        raise ValueError(f"override {key}: {refused[parts[0]]}")
    if parts[0] not in schema:
        raise ValueError(f"override {key}: unknown section {parts[0]!r}; valid: {list(schema)}")
    if len(parts) == 1:
        raise ValueError(f"override {key}: name a key inside the section, e.g. {parts[0]}.<key>=...")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"override {key}: cannot parse value {text!r}: {e}") from e
    fields = _fields(schema[parts[0]])
    if parts[1] not in fields:
        raise ValueError(f"override {key}: unknown key; valid keys of {parts[0]} are {sorted(fields)}")
    annotation = fields[parts[1]]
    if len(parts) > 2:
        free = next((a for a in (annotation, *typing.get_args(annotation)) if typing.get_origin(a) is dict), None)
        if free is None:
            raise ValueError(f"override {key}: {parts[0]}.{parts[1]} is not a mapping")
        annotation = typing.get_args(free)[1] if len(parts) == 3 and typing.get_args(free) else Any
    try:
        check_value(value, annotation, key)
    except ValueError as e:
        raise ValueError(f"override {override}: {str(e).removeprefix(key).lstrip(': ')}") from None
    return key, value


def _fields(section: Any) -> dict[str, Any]:
    """{key: annotation} of a schema section (a dataclass, or already such a mapping)."""
    if dataclasses.is_dataclass(section):
        hints = typing.get_type_hints(section)
        return {f.name: hints[f.name] for f in dataclasses.fields(section) if f.init}
    return dict(section)


def type_name(tp: Any) -> str:
    """How an annotation reads in error messages: ``int``, ``list of 2 float``, ``one of 'a', 'b'``, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"list of {len(args)} {type_name(args[0])}"
    if origin in (list, tuple, Sequence):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _mismatch(key: str, tp: Any, value: Any) -> ValueError:
    return ValueError(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
