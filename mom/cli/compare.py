"""`mom-compare`: validation (or training) loss per modality against training FLOPs, MoM vs its dense twin.

    mom-compare --run MoM=runs/tiny_mom --run dense=runs/tiny_dense --baseline dense --out compare.png
    mom-compare --run MoM=runs/m_s0,runs/m_s1,runs/m_s2 --run dense=runs/d_s0,runs/d_s1,runs/d_s2 --baseline dense

`mom.evaluation.compare` reads the runs' metrics.jsonl and computes the shares; docs/evaluation.md explains them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mom.cli.common import add_debug_flag, run
from mom.evaluation.compare import plot, read_run, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mom-compare",
        description="Loss per modality against training FLOPs of mom-train runs, and the share of a baseline's "
        "FLOPs at which each run first reached the baseline's final loss.",
        epilog="example: mom-compare --run MoM=runs/tiny_mom --run dense=runs/tiny_dense --baseline dense "
        "--out compare.png (docs/evaluation.md)",
    )
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR[,DIR...]",
                        help="a mom-train out_dir (or metrics.jsonl), repeatable; several comma-separated "
                        "directories are seeds of one configuration")
    parser.add_argument("--baseline", help="NAME of the run the others are measured against (e.g. the dense twin)")
    parser.add_argument("--split", default="validation", choices=("validation", "train"))
    parser.add_argument("--out", help="write the plot to this PNG (needs matplotlib)")
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = []
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--run {spec!r}: expected NAME=DIR, e.g. --run MoM=runs/tiny_mom")
        dirs = path.split(",")
        if not all(dirs):
            parser.error(f"--run {spec!r}: an empty directory in the comma-separated list")
        runs.append((name, dirs))
    names = [name for name, _ in runs]
    if args.baseline is not None and args.baseline not in names:
        parser.error(f"--baseline {args.baseline!r}: not one of the runs {names}")
    return run("mom-compare", lambda: _main(args, runs), args.debug)


def _main(args: argparse.Namespace, specs: list[tuple[str, list[str]]]) -> int:
    runs = [read_run(name, dirs, args.split) for name, dirs in specs]
    baseline = next((r for r in runs if r.name == args.baseline), None)
    print(report(runs, baseline))
    if args.out:
        plot(runs, args.out)
        print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
