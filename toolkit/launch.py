"""The launch command: resolve and check a recipe, then dry-run it, run it locally, or submit it.

`python -m toolkit.launch RECIPE [key=value ...] [--local | --nodes N ...] [--dry-run] [--sweep]`;
what it does is `toolkit.cluster.launching`'s (`--help` lists every flag).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from toolkit.cluster.launching import launch, parse_args
from toolkit.cluster.sweeps import run_sweep
from toolkit.core import cli


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    return run_sweep(args) if args.sweep else launch(args)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
