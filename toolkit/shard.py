"""The shard command: a source folder -> WebDataset tars per split (train/val) + manifest.json.

The writing itself is `toolkit.data.sharding`'s; `--verify` checks shards against their manifest.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from toolkit.core import cli
from toolkit.core.errors import UserError
from toolkit.data.format import verify
from toolkit.data.sharding import shard
from toolkit.data.storage import parse_options

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> Any:
    p = cli.ArgumentParser(
        prog="python -m toolkit.shard",
        description="Shard a folder of images/.npy (HR only, or paired hr/ and lr/) into "
        "WebDataset tars: OUT/train, OUT/val and OUT/manifest.json.",
    )
    p.add_argument(
        "src", metavar="SRC", nargs="?", help="source folder (images/.npy, or hr/ + lr/)"
    )
    p.add_argument("out", metavar="OUT", nargs="?",
                   help="output folder, or an object store's URL (s3://bucket/prefix)")  # fmt: skip
    p.add_argument("--verify", metavar="DIR", help="check DIR's shards (a folder or a URL) "
                   "against the sha256 and size its manifest records (writes nothing)")  # fmt: skip
    p.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE",
                   help="how to reach a URL's store, as a recipe's data.storage_options: "
                   "endpoint_url=URL (an S3-compatible store), region=NAME, anonymous=true, "
                   "attempts=N; credentials only from the environment (AWS_ACCESS_KEY_ID, "
                   "AWS_SECRET_ACCESS_KEY) or the AWS configuration")  # fmt: skip
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of samples in val "
        "(default %(default)s), by a hash of each key: adding files never moves existing ones",
    )
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="processes writing shards")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the split and order")
    p.add_argument("--overwrite", action="store_true", help="replace the shards in a non-empty OUT")
    p.add_argument("--strict", action="store_true", help="a corrupt file is an error, not a skip")
    p.add_argument("--nonfinite", choices=("refuse", "zero"), default="refuse",
                   help="NaN/inf pixels (masked or missing data): refuse the file (skipped, or "
                   "an error with --strict; the default), or fill them with 0 and count them "
                   "per file in the manifest")  # fmt: skip
    p.add_argument("--normalise", metavar="NAME[:P,...]",
                   help="how the loader maps values for a model, recorded in the manifest (a "
                   "recipe's data.normalise overrides it): unit, none, minmax, percentile[:LO,HI],"
                   " asinh[:SOFT]; default: unit for values in [0, 1], else none. The shards keep "
                   "the values as they are")  # fmt: skip
    p.add_argument("--labels", action="store_true",
                   help="SRC holds a folder per class (SRC/<class>/...): each sample is stored "
                   "with its class (webdataset `cls`: its index in the sorted names)")  # fmt: skip
    p.add_argument(
        "--hdu",
        metavar="NAME|INDEX",
        help="the FITS HDU to read (e.g. SCI); default: the first holding an image",
    )
    args = p.parse_args(argv)
    if args.verify is not None and (args.src or args.out):
        p.error("--verify DIR checks shards: give no SRC or OUT with it")
    if args.verify is None and not (args.src and args.out):
        p.error("expected SRC and OUT (or --verify DIR)")
    return args


def _main(argv: Sequence[str] | None) -> int:
    a = parse_args(argv)
    storage = parse_options(a.storage)
    if a.verify is not None:
        checked, problems = verify(a.verify, storage)
        for line in problems[1:]:
            logger.error("%s", line)
        if problems:
            raise UserError(f"{problems[0]} ({len(problems)} of {checked} shards differ)")
        logger.info("%s: %d shards match their manifest entries (size and sha256)", a.verify,
                    checked)  # fmt: skip
        return 0
    shard(
        a.src,
        a.out,
        val_fraction=a.val_fraction,
        shard_size=a.shard_size,
        workers=a.workers,
        seed=a.seed,
        overwrite=a.overwrite,
        strict=a.strict,
        nonfinite=a.nonfinite,
        normalise=a.normalise,
        hdu=a.hdu,
        labels=a.labels,
        storage=storage,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
