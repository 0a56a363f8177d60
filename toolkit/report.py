"""Run directories -> results tables (one per task; Markdown, JSON), loss curves, sample maps.

    python -m toolkit.report RUN_DIR [RUN_DIR ...] [--out reports/] [--samples 4]

Reads each run's `recipe.yaml`, `eval.json` (written at the end of training, or by
`python -m toolkit.evaluate`) and `metrics.jsonl`; the sample maps run the exported model on the
first validation samples. Writes `results.md`, `results.json`, `loss_<run>.png`,
`samples_<run>.png`, where runs can be compared `compare.png`, and for a sweep with a numeric
swept key `curve_<key>.png`: each metric against that key (PNG figures).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from toolkit.core import cli
from toolkit.core.errors import UserError
from toolkit.reporting.tables import markdown_all
from toolkit.reporting.write import report


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m toolkit.report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=Path("reports"), help="output folder")
    p.add_argument("--samples", type=int, default=4, help="validation samples in the maps")
    p.add_argument("--pair", action="append", default=[], metavar="A:B",
                   help="a paired difference A - B to add (run names as the rows show "
                        "them), besides each run against the best and the reference; "
                        "repeatable")  # fmt: skip
    args = p.parse_args(argv)
    if not 1 <= args.samples <= 16:
        raise UserError("--samples must be between 1 and 16")
    pairs = []
    for text in args.pair:
        a, colon, b = text.partition(":")
        if not (a and colon and b):
            raise UserError(f"--pair {text}: expected A:B, two run names")
        pairs.append((a, b))
    doc = report(args.runs, args.out, args.samples, pairs)
    sys.stdout.write(markdown_all(doc) + f"\n(written to {args.out})\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
