"""Inputs a run needs that a later step may create: warnings in a dry run, errors at launch."""

from __future__ import annotations

from pathlib import Path

from toolkit import recipe
from toolkit.data.format import MANIFEST, mismatches, read_manifest
from toolkit.errors import UserError
from toolkit.hold import holder_of, refusal


def problems(r: recipe.Recipe, *, chained: bool = False) -> list[str]:
    """What is missing or does not fit. `chained`: an earlier stage submitted in the same chain
    will write init.from, so its absence is expected."""
    out = []
    if not (Path(r.data.shards) / MANIFEST).is_file():
        out.append(
            f"data.shards: {Path(r.data.shards) / MANIFEST} not found: make the shards first with "
            f"`python -m toolkit.shard SRC {r.data.shards}`"
        )
    else:
        try:
            manifest = read_manifest(r.data.shards)
        except UserError as err:
            out.append(f"data.shards: {err}")
        else:
            out += mismatches(manifest, r.model.in_chans, r.model.img_size)
    if r.init.from_ and not chained and not Path(r.init.from_).exists():
        out.append(
            f"init.from: {r.init.from_} does not exist yet: run the stage that writes it first"
        )
    holder = holder_of(r.run_dir)  # one writer per run directory (toolkit/hold.py)
    if holder is not None:
        out.append(f"run.dir: {refusal(r.run_dir, holder)}")
    return out


def require(r: recipe.Recipe, *, chained: bool = False) -> None:
    """Raise the first problem as a user error: a real launch cannot go on without it."""
    found = problems(r, chained=chained)
    if found:
        raise UserError(found[0])
