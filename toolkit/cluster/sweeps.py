"""`launch --sweep`: a sweep's variants listed (--dry-run), trained in turn on this machine
(--local), or submitted as one Slurm job array."""

from __future__ import annotations

import copy
import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.cluster.launching import (
    SLURM_FLAGS,
    Stage,
    after_of,
    dry_run_doc,
    dry_run_text,
    run_local,
    wait_for,
    world_of,
)
from toolkit.core.errors import UserError
from toolkit.runs import preflight, recipe, sweep

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Planned:
    """One variant of the sweep: its recipe file, overrides, resolved recipe and command line."""

    variant: sweep.Variant
    path: str  # its recipe file: the launch's, or its value of a swept `recipe`
    recipe: recipe.Recipe
    overrides: list[str]  # the launch's overrides, the variant's, and its run.dir


# What the recipes of a swept `recipe` must share, and why.
_SHARED = (
    ("task", "one report table"),
    ("run.dir", "one sweep directory"),
    ("cluster", "one job array"),
)


def _base(args: Any, files: list[str] | None) -> Path:
    """The sweep's directory: the recipe's run.dir, or the one every swept recipe file names
    (each loaded here with the launch's overrides, so a file that does not load, or that
    differs from the first in task, run.dir or cluster, is refused before anything is
    written). A recipe both given and swept, or neither, is refused too."""
    if files and args.recipe:
        raise UserError(f"--sweep {sweep.RECIPE}: the recipe is swept, so no recipe file goes on "
                        f"the command line: expected {args.recipe} in the sweep, or no recipe "
                        "swept")  # fmt: skip
    if not files:
        if not args.recipe:
            raise UserError("no recipe given: expected a recipe file (.yaml/.yml) or a sweep "
                            f"of `{sweep.RECIPE}`")  # fmt: skip
        return recipe.load(args.recipe, args.overrides).run_dir
    first = files[0]
    want = _shared(first, args.overrides)
    for path in files[1:]:
        got = _shared(path, args.overrides)
        for key, why in _SHARED:
            a, b = sweep.value_at(want, key), sweep.value_at(got, key)
            while isinstance(a, dict) and isinstance(b, dict) and a != b:  # name the setting
                sub = next(k for k in {**a, **b} if a.get(k) != b.get(k))
                key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
            if a != b:
                raise UserError(
                    f"{path}: {key}: {b!r}, but {first} has {a!r}: expected the swept recipes "
                    f"to share {key} ({why})"
                )
    return recipe.load(first, args.overrides).run_dir


def _shared(path: str, overrides: list[str]) -> dict[str, Any]:
    """A recipe file's plain data, its run.dir resolved (a recipe without one is named by its
    `name`: two such files are two directories)."""
    r = recipe.load(path, overrides)
    doc = recipe.to_dict(r)
    doc["run"]["dir"] = str(r.run_dir)
    return doc


def plan(args: Any) -> tuple[Path, dict[str, list[str]], list[Planned]]:
    """(the sweep's directory, the swept values, every variant resolved); a variant whose
    overrides do not make a valid recipe, or that trains the very recipe another one does
    (optim.lr=1e-3 and 0.001), stops it here, named, before anything is written."""
    axes = sweep.parse(args.sweep, args.overrides)
    base = _base(args, axes.get(sweep.RECIPE))
    out: list[Planned] = []
    seen: dict[str, Planned] = {}
    for v in sweep.variants(axes):
        path = v.recipe or args.recipe
        overrides = [*args.overrides, *v.settings, f"run.dir={base / v.name}"]
        p = Planned(v, path, recipe.load(path, overrides), overrides)
        same = seen.setdefault(_trained(p.recipe), p)
        if same is not p:
            a, b = next((x, y) for x, y in zip(same.variant.overrides, v.overrides, strict=True)
                        if x != y)  # fmt: skip
            raise UserError(
                f"--sweep {a.partition('=')[0]}: {a!r} and {b!r} give the same recipe (variants "
                f"{same.variant.index} and {v.index} would train one thing twice): expected "
                "values that differ"
            )
        out.append(p)
    return base, axes, out


def _trained(r: recipe.Recipe) -> str:
    """What a variant trains: its resolved recipe but its run directory (which always
    differs), as comparable text."""
    doc = recipe.to_dict(r)
    doc["run"]["dir"] = None
    return json.dumps(doc, sort_keys=True, default=str)


def _listing(base: Path, axes: dict[str, list[str]], planned: list[Planned], where: str) -> str:
    product = " x ".join(f"{k} ({len(vs)})" for k, vs in axes.items())
    lines = [f"sweep: {len(planned)} variant(s) of {product} in {base}, {where}"]
    lines += [f"  {p.variant.index:>3}  {' '.join(p.variant.overrides)}  -> {p.recipe.run_dir}"
              for p in planned]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_sweep(args: Any) -> int:
    base, axes, planned = plan(args)
    limit = min(args.array_limit or len(planned), len(planned))
    if args.local:
        where = "trained in turn on this machine"
    else:
        where = f"one Slurm job array, at most {limit} at a time"
    if args.dry_run:
        return _dry_run(args, base, axes, planned, where, limit)
    if args.local:
        return _run_local(args, base, axes, planned)
    return _run_slurm(args, base, axes, planned, limit)


def _dry_run(args: Any, base: Path, axes: dict, planned: list[Planned], where: str,
             limit: int) -> int:  # fmt: skip
    script = None
    if not args.local:
        from toolkit.cluster import slurm

        spec = slurm.job_spec(planned[0].recipe, {k: getattr(args, k) for k in SLURM_FLAGS})
        after = after_of(args)
        params = slurm.parameters(spec, f"afterok:{after}" if after else None)
        script = slurm.sbatch_script(base.absolute() / "slurm", params,
                                     array=(len(planned), limit))  # fmt: skip
    worlds = [world_of(p.recipe, args) for p in planned]
    if args.json:
        doc = {
            "sweep": {
                "dir": str(base),
                "axes": axes,
                "array": None if args.local else f"0-{len(planned) - 1}%{limit}",
                "sbatch": script,
            },
            "variants": [
                {
                    "index": p.variant.index,
                    "overrides": list(p.variant.overrides),
                    **dry_run_doc(p.recipe, w, preflight.problems(p.recipe), None),
                }
                for p, w in zip(planned, worlds, strict=True)
            ],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    first = planned[0]
    text = dry_run_text(first.path, first.recipe, worlds[0], preflight.problems(first.recipe),
                        as_json=False, sbatch=script)  # fmt: skip
    sys.stdout.write(_listing(base, axes, planned, where) + "\n# variant 0\n" + text)
    return 0


def _run_local(args: Any, base: Path, axes: dict, planned: list[Planned]) -> int:
    """Each variant in turn, as `launch --local` would run it; a failed one does not stop the
    others. Exit status: 0, or the first failure's."""
    sweep.write(base, args.recipe, axes, [p.variant for p in planned])
    sys.stdout.write(_listing(base, axes, planned, "trained in turn on this machine"))
    failed: list[tuple[Planned, int | str]] = []
    for p in planned:
        logger.info("sweep variant %d of %d: %s", p.variant.index + 1, len(planned),
                    " ".join(p.variant.overrides))  # fmt: skip
        one = copy.copy(args)
        one.recipe, one.overrides = p.path, p.overrides
        try:
            status = run_local(one, p.recipe)  # a finished variant is left as it is
        except UserError as err:
            sys.stderr.write(f"error: variant {p.variant.index}: {err}\n")
            status = 2
        if status:
            failed.append((p, status))
    if failed:
        names = ", ".join(f"{p.variant.index} ({p.variant.name}: status {s})" for p, s in failed)
        sys.stderr.write(f"error: {len(failed)} of {len(planned)} variants failed: {names}\n")
        return int(failed[0][1]) if isinstance(failed[0][1], int) else 1
    sys.stdout.write(f"sweep done: {len(planned)} runs in {base}; compare them with: "
                     f"python -m toolkit.report {shlex.quote(str(base))}\n")  # fmt: skip
    return 0


def _run_slurm(args: Any, base: Path, axes: dict, planned: list[Planned], limit: int) -> int:
    from toolkit.cluster import slurm

    slurm.require_slurm()
    world = world_of(planned[0].recipe, args)
    todo = []
    for p in planned:  # a finished variant is left out of the array, as it is
        done, _ = preflight.admit(p.recipe, world.world_size)
        if done is not None:
            logger.warning("%s", done.line())
            continue
        todo.append(p)
    if not todo:
        sys.stdout.write(f"sweep: all {len(planned)} variants are complete; compare them with: "
                         f"python -m toolkit.report {shlex.quote(str(base))}\n")  # fmt: skip
        return 0
    limit = min(limit, len(todo))
    spec = slurm.job_spec(planned[0].recipe, {k: getattr(args, k) for k in SLURM_FLAGS})
    after = after_of(args)
    folder = base.absolute() / "slurm"
    argvs = [[p.path, *p.overrides] for p in todo]
    jobs = slurm.submit_array(spec, folder, argvs, after, limit)
    array = jobs[0].job_id.split("_")[0]
    sweep.write(base, args.recipe, axes, [p.variant for p in planned], array)
    left = f" ({len(planned) - len(todo)} complete, left out)" if len(todo) < len(planned) else ""
    sys.stdout.write(
        f"array job {array}: {len(todo)} variant(s){left}, at most {limit} at a time, each "
        f"{world.nodes} node(s) x {max(world.gpus_per_node, 1)} process(es)\n"
        f"  sweep dir: {base} (sweep.json; a run directory per variant)\n"
        f"  logs:      {folder / f'{array}_<variant>_0_log.err'}\n"
        f"  compare:   python -m toolkit.report {shlex.quote(str(base))}\n"
    )
    for p, job in zip(todo, jobs, strict=True):
        sys.stdout.write(f"job {job.job_id}: {' '.join(p.variant.overrides)}\n")
    sys.stdout.flush()
    if not args.wait:
        return 0
    return wait_for([(Stage(p.path, p.recipe, world, spec, False), job)
                     for p, job in zip(todo, jobs, strict=True)])  # fmt: skip
