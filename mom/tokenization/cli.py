"""`mom-tokenizer {text,image,speech} ...`: train / evaluate one of the tokenizers.

Each sub-command forwards its arguments to the tokenizer module's own CLI, e.g.
``mom-tokenizer image train --recipe tokenizers/recipes/image_small.yaml --out tokenizers/small/image``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

KINDS = {"text": "mom.tokenization.text", "image": "mom.tokenization.image", "speech": "mom.tokenization.speech"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in KINDS:
        print(__doc__)
        print(f"usage: mom-tokenizer {{{','.join(KINDS)}}} <command> [options]   (then --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(KINDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
