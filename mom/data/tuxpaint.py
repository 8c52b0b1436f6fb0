"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``): drawings with a written description, spoken by people.

Under ``/usr/share/tuxpaint/stamps/<category>/.../`` a stamp ``NAME`` is ``NAME.png`` (or ``NAME.svg``) with

* ``NAME.txt``: the English description on its first line, then ``<lang>.utf8=<translation>`` lines;
* ``NAME_desc.ogg``: the English description read aloud, ``NAME_desc_<lang>.ogg``: a translation read aloud
  (real recordings by volunteers: French, Russian, Romanian, Catalan, Bulgarian, Belarusian, Greek, ...);
* ``NAME.dat``: options; ``noflip`` means the drawing must not be mirrored (text, a clock, ...);
* ``NAME.ogg``: a sound effect (an animal's call), not speech: not used; ``NAME_mirror.png``: a hand-drawn
  mirror image of the stamp, skipped (the augmentation mirrors when allowed).

:func:`list_stamps` reads the listing; the image source ``tuxpaint`` (:mod:`mom.data.images`) and the speech source
``tuxpaint`` (:mod:`mom.data.speech`) read the drawings and the recordings. The stamps are GPL-2.0-or-later
(Debian's copyright file of ``tuxpaint-stamps-default``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mom.utils.errors import BadInputError, MissingDependencyError

TUXPAINT_STAMPS_DIR = "/usr/share/tuxpaint/stamps"  # Debian package tuxpaint-stamps-default
ENGLISH = "en"
_TRANSLATION = re.compile(r"^([A-Za-z]{2,3}(?:_[A-Za-z]{2})?(?:@\w+)?)\.utf8=(.*)$")
_RECORDING = re.compile(r"^(?P<name>.+)_desc(?:_(?P<lang>[A-Za-z]{2,3}(?:_[A-Za-z]{2})?))?\.ogg$")


@dataclass
class Stamp:
    """One stamp: ``key`` (path below the stamps folder, no suffix), its drawing, descriptions by language
    (lower case, ``en`` = the first line), recordings by language, and whether it may be mirrored.
    ``error`` is set (and the rest may be empty) when the description file cannot be read."""

    key: str
    image: Path | None
    descriptions: dict[str, str] = field(default_factory=dict)
    recordings: dict[str, Path] = field(default_factory=dict)
    flip_ok: bool = True
    error: BadInputError | None = None

    @property
    def category(self) -> str:
        """The folders above the stamp, e.g. ``animals/marsupials``."""
        return self.key.rpartition("/")[0]


def parse_description(text: str) -> dict[str, str]:
    """Descriptions by language from a stamp's ``.txt``: the first plain line is English; ``xx.utf8=`` lines
    give translations (language codes lower-cased, ``en_GB`` -> ``en_gb``)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        match = _TRANSLATION.match(line)
        if match:
            if match.group(2).strip():
                out.setdefault(match.group(1).lower(), match.group(2).strip())
        elif ENGLISH not in out:
            out[ENGLISH] = line
    return out


def stamps_root(path: str | None) -> Path:
    """The stamps folder (``path`` or Debian's); :class:`MissingDependencyError` when it is not there."""
    root = Path(path or TUXPAINT_STAMPS_DIR)
    if not root.is_dir():
        raise MissingDependencyError(
            f"the 'tuxpaint' source needs the Tux Paint stamps at {root}: `apt-get install tuxpaint-stamps-default` "
            "(or pass path=<a folder of stamps>)"
        )
    return root


def list_stamps(root: Path) -> list[Stamp]:
    """Every stamp with a description file under ``root``, sorted by key."""
    stamps = []
    for txt in sorted(root.rglob("*.txt")):
        base = txt.with_suffix("")
        image = next((p for p in (base.with_suffix(".png"), base.with_suffix(".svg")) if p.is_file()), None)
        key = base.relative_to(root).as_posix()
        stamp = Stamp(key=key, image=image)
        try:
            stamp.descriptions = parse_description(txt.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            stamp.error = BadInputError(str(txt), f"cannot read the description as UTF-8 ({type(e).__name__}: {e})")
        dat = base.with_suffix(".dat")
        if dat.is_file():
            stamp.flip_ok = "noflip" not in dat.read_text(encoding="utf-8", errors="replace").split()
        for ogg in sorted(txt.parent.glob(f"{glob_escape(base.name)}_desc*.ogg")):
            match = _RECORDING.match(ogg.name)
            if match and match.group("name") == base.name:
                stamp.recordings[(match.group("lang") or ENGLISH).lower()] = ogg
        stamps.append(stamp)
    return stamps


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (stamp names may hold brackets)."""
    return re.sub(r"([*?\[\]])", r"[\1]", name)
