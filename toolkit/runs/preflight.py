"""Inputs a run needs that a later step may create: warnings in a dry run, errors at launch."""

from __future__ import annotations

from pathlib import Path

from toolkit.core.errors import UserError
from toolkit.data import subset
from toolkit.data.format import MANIFEST, Manifest, read_manifest
from toolkit.data.storage import is_url
from toolkit.runs import recipe
from toolkit.runs.directory import Finished, check_relaunch, shard_problems
from toolkit.runs.hold import holder_of, refusal


def problems(
    r: recipe.Recipe, *, chained: bool = False, manifest: Manifest | None = None
) -> list[str]:
    """What is missing or does not fit. `chained`: an earlier stage submitted in the same chain
    will write init.from, so its absence is expected. `manifest`: the one of `r`'s shards, where
    the caller has read it."""
    out = []
    if manifest is not None:
        out += shard_problems(r, manifest)
        out += subset.problems(manifest, r.data)
    elif not is_url(r.data.shards) and not (Path(r.data.shards) / MANIFEST).is_file():
        out.append(
            f"data.shards: {Path(r.data.shards) / MANIFEST} not found: make the shards first with "
            f"`python -m toolkit.shard SRC {r.data.shards}`"
        )
    else:
        try:
            manifest = read_manifest(r.data.shards, r.data.storage_options)
        except UserError as err:
            out.append(f"data.shards: {err}")
        else:
            out += shard_problems(r, manifest)
            out += subset.problems(manifest, r.data)
    if r.init.from_ and not chained and not Path(r.init.from_).exists():
        out.append(
            f"init.from: {r.init.from_} does not exist yet: run the stage that writes it first"
        )
    problem = foreign(r.run_dir)
    if problem:
        out.append(f"run.dir: {problem}")
    holder = holder_of(r.run_dir)  # one writer per run directory (toolkit/runs/hold.py)
    if holder is not None:
        out.append(f"run.dir: {refusal(r.run_dir, holder)}")
    return out


# What a run directory holds (README, "The run directory"); `slurm/` comes first, from the
# scheduler, before the job's first process has written anything.
RUN_ENTRIES = ("recipe.yaml", "data.json", "subset.json", "checkpoints", "model.safetensors",
               "tb", "metrics.jsonl", "slurm", ".hold")  # fmt: skip


def foreign(run_dir: Path) -> str | None:
    """Why `run_dir` cannot hold a run: a file, or a folder of other things (a data folder, a
    sweep's folder) into which a run would be written among them."""
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        return f"{run_dir} is a file, not a run directory"
    others = sorted(
        p.name for p in run_dir.iterdir()
        if p.name not in RUN_ENTRIES and not p.name.startswith(("eval", "."))
    )  # fmt: skip
    if others and not (run_dir / "recipe.yaml").is_file():
        return (
            f"{run_dir} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} and no "
            "run: give the run a folder of its own"
        )
    return None


def relaunch_notes(r: recipe.Recipe, world_size: int) -> list[str]:
    """What a launch would find in run.dir, for a dry run to say: a finished run it would leave
    as it is, or a run of another model it would refuse (a held one: `problems` says so)."""
    if holder_of(r.run_dir) is not None:
        return []
    try:
        done = check_relaunch(r, world_size)
    except UserError as err:
        return [f"run.dir: {err}"]
    return [f"run.dir: {done.line()}"] if done is not None else []


def require(r: recipe.Recipe, *, chained: bool = False, manifest: Manifest | None = None) -> None:
    """Raise the first problem as a user error: a real launch cannot go on without it."""
    found = problems(r, chained=chained, manifest=manifest)
    if found:
        raise UserError(found[0])


def admit(
    r: recipe.Recipe, world_size: int, *, chained: bool = False
) -> tuple[Finished | None, Manifest | None]:
    """Whether `r` trains on `world_size` processes, its shards' manifest read once for both
    checks (seconds a read at 1e5 shards): the finished run that is left as it is (nothing to
    train), else the manifest; the relaunch's refusal or the first problem as a user error."""
    try:
        manifest = read_manifest(r.data.shards, r.data.storage_options)
    except UserError:  # a finished run needs no shards; else `require` says what is wrong
        manifest = None
    done = check_relaunch(r, world_size, manifest)
    if done is not None:
        return done, None
    require(r, chained=chained, manifest=manifest)
    return None, manifest
