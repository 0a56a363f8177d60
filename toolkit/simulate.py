"""The simulate command: strong-lensing LR/HR pairs, or labelled images by substructure class.

    python -m toolkit.simulate OUT --count N [--seed S] [--workers W] [--overwrite] [--classes]

The simulators are `toolkit.data.sim` (lensing.py: the physics and its calibration;
substructure.py: the classes). `python -m toolkit.data.lensing`, its name before, runs this too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from toolkit.core import cli
from toolkit.data.sim.write import generate


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m toolkit.simulate",
        description="Simulate strong-lensing LR (75x75) / HR (150x150) pairs with lenstronomy: "
        "OUT/hr/<key>.npy and OUT/lr/<key>.npy, float32 in [0, 1], and OUT/meta/<key>.json, "
        "each pair's pixel scales, PSF widths and noise.",
    )
    p.add_argument("out", metavar="OUT", help="output folder (gets hr/, lr/ and meta/)")
    p.add_argument("--count", type=int, required=True, help="number of pairs")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p.add_argument("--classes", action="store_true", help="labelled HR images by dark-matter "
                   "substructure instead: OUT/<class>/<key>.npy, classes cdm, no_sub, vortex "
                   "in turn (toolkit.data.sim.substructure); shard them with --labels")  # fmt: skip
    return p.parse_args(argv)


def _main(argv: Sequence[str] | None) -> int:
    a = parse_args(argv)
    generate(a.out, a.count, seed=a.seed, workers=a.workers, overwrite=a.overwrite,
             classes=a.classes)  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
