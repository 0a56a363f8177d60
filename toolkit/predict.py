"""Super-resolve images with a trained model, in their own format and units.

    python -m toolkit.predict RUN_DIR|CHECKPOINT|WEIGHTS INPUT... --out DIR
                              [--tile T] [--overlap O] [--shifts K] [--batch N]
                              [--precision fp32|bf16]
                              [--hdu NAME] [--split val] [--local --procs P]

INPUT: image files (.npy, .fits, .png, .tif, ...), folders of them (searched recursively) or
shard directories (their LR images, or HR degraded as in training). Each output is written to
DIR under the input's relative name (a shard sample: its key), in the input's format, with the
run's normalisation inverted (per-image statistics fitted on the whole input), atomically: a
rerun skips what is written, so a killed prediction resumes where it stopped. Images of any
size go through the model in overlapping, cross-faded tiles (`toolkit/prediction/tiles.py`); models
with a fixed input size (SR-MAE) take tiles of that size, others whole images unless --tile is
given. Launched on several processes (torchrun, srun, or `--local --procs P`), each writes its
share of the files, every file once. One writer per output folder (`toolkit/runs/hold.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from toolkit.cluster import env
from toolkit.core import cli
from toolkit.core.atomic import write_atomic
from toolkit.core.errors import UserError
from toolkit.core.schema import StorageConfig
from toolkit.data.fit import Expected, misfit
from toolkit.data.normalise import Normalisation, parse, resolve
from toolkit.models import MODELS
from toolkit.prediction.files import Like, encode
from toolkit.prediction.inputs import Job, list_jobs, read_job
from toolkit.prediction.tiles import Canvas, Tiling, assemble
from toolkit.runs.directory import Target, expected_by, load_model, locate
from toolkit.runs.hold import acquire, refuse_if_held
from toolkit.runs.recipe import Recipe

logger = logging.getLogger(__name__)

# Set by `--local --procs P` for the processes it starts: they leave the exit status to it.
_LAUNCHED = "SRMAE_PREDICT_LAUNCHED"
_PREFETCH = 4  # images read ahead of the model, in threads, so reading overlaps computing


def tiling_for(
    r: Recipe, tile: int | None, overlap: int | None, shifts: int | None = None
) -> Tiling:
    """The tiles a recipe's model gets: its fixed input size, else whole images or --tile;
    `shifts` tilings averaged (default 2 for a fixed-size model, whose answer depends on where
    its tile's edges fall, else 1)."""
    spec = MODELS.get(r.model.arch)
    scale = r.data.scale
    if spec.fixed_size:  # type: ignore[union-attr]
        size = r.model.img_size // scale
        if tile not in (None, size):
            raise UserError(
                f"--tile {tile}: {spec.title} takes LR tiles of exactly {size} pixels "  # type: ignore[union-attr]
                f"(model.img_size {r.model.img_size} / data.scale {scale})"
            )
        tile = size
    tile = tile or 0
    if tile < 0:
        raise UserError(f"--tile {tile}: expected a tile side in LR pixels, or 0 for whole images")
    overlap = tile // 4 if overlap is None else overlap
    if tile and not 0 <= overlap < tile:
        raise UserError(f"--overlap {overlap}: expected 0 <= overlap < the tile side {tile}")
    fixed = spec.fixed_size  # type: ignore[union-attr]
    if shifts is not None and (shifts < 1 or (shifts > 1 and not tile)):
        raise UserError(f"--shifts {shifts}: expected 1 or more, and more than 1 only with tiles")
    shifts = shifts or (2 if fixed else 1)
    return Tiling(tile, overlap if tile else 0, fixed, shifts)


def share(jobs: list[Job], rank: int, world_size: int) -> list[Job]:
    """This process's jobs: the largest first to the least loaded process, so that the bytes
    are balanced; the same answer on every process, each job in exactly one share."""
    loads = [0] * world_size
    mine = []
    for i in sorted(range(len(jobs)), key=lambda i: (-jobs[i].size, i)):
        p = min(range(world_size), key=lambda k: (loads[k], k))
        loads[p] += jobs[i].size
        if p == rank:
            mine.append(i)
    return [jobs[i] for i in sorted(mine)]


def _read_ahead(jobs: list[Job], scale: int) -> Iterator[tuple[Job, Any]]:
    """(job, (input, like) or the ValueError that stopped it), in order, read in threads."""
    with ThreadPoolExecutor(2, thread_name_prefix="predict-read") as pool:
        queue: deque[tuple[Job, Future]] = deque()
        rest = iter(jobs)
        for job in rest:
            queue.append((job, pool.submit(read_job, job, scale)))
            if len(queue) < _PREFETCH:
                continue
            yield _result(*queue.popleft())
        while queue:
            yield _result(*queue.popleft())


def _result(job: Job, fut: Future) -> tuple[Job, Any]:
    try:
        return job, fut.result()
    except ValueError as err:
        return job, err


@dataclass(frozen=True)
class Fit:
    """How inputs are mapped for the model (the run's normalisation, or --normalise) and what
    they must look like to fit it (`toolkit/data/fit.py`)."""

    norm: Normalisation
    expected: Expected
    scale: int

    def misfit(self, job: Job, x: torch.Tensor) -> str | None:
        return misfit(job.where, x, self.norm, self.expected)

    def refusal(self, jobs: list[Job]) -> list[str]:
        """Why each readable job that does not fit does not (a file that cannot be read is left
        to the run, which names it and writes the others)."""
        found = []
        for job, got in _read_ahead(jobs, self.scale):
            if not isinstance(got, Exception):
                problem = self.misfit(job, got[0])
                if problem is not None:
                    found.append(problem)
        return found


def fit_of(target: Target, tiling: Tiling, normalise: str | None) -> Fit:
    """The inputs' map (`--normalise`, else the run's) and what fits the target's model: for a
    fixed-size model, images at least half its tile on a side (less is mostly padding)."""
    r = target.recipe
    try:
        norm = parse(normalise) if normalise else resolve(r.data.normalise, None)
    except ValueError as err:
        raise UserError(f"--normalise {err}") from None
    min_side = -(-tiling.tile // 2) if tiling.fixed else 1
    return Fit(norm, expected_by(target, min_side), r.data.scale)


def refuse_misfits(problems: list[str]) -> None:
    """Inputs that do not fit the run stop the prediction before anything is written."""
    if problems:
        more = (
            f" ({len(problems) - 1} more input(s) do not fit either)" if len(problems) > 1 else ""
        )
        raise UserError(problems[0] + more)


class Predictor:
    """A model with its normalisation, applied to one process's share of the images."""

    def __init__(
        self, model: torch.nn.Module, fit: Fit, tiling: Tiling, engine: Any, batch: int
    ) -> None:
        self.model, self.tiling, self.engine, self.batch = model, tiling, engine, batch
        self.scale, self.fit = fit.scale, fit
        self.norm: Normalisation = fit.norm
        self.failed: list[str] = []

    @torch.no_grad()
    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        try:
            with self.engine.autocast():
                out = self.model(tiles.to(self.engine.device, non_blocking=True))
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError itself (2.4+); 1.13+
            raise UserError(
                f"out of memory on {self.engine.device} for {len(tiles)} tile(s) of "
                f"{tuple(tiles.shape[-2:])}: use a smaller --batch or --tile"
            ) from None
        return out.float().cpu()

    def fail(self, job: Job, reason: object) -> None:
        logger.error("%s: %s", job.where, reason)
        self.failed.append(f"{job.where}: {reason}")

    def canvases(self, jobs: list[Job]) -> Iterator[Canvas]:
        """The normalised input of each readable job, to be tiled; the others reported."""
        for job, got in _read_ahead(jobs, self.scale):
            if isinstance(got, Exception):
                self.fail(job, got)
                continue
            x, like = got
            problem = self.fit.misfit(job, x)  # checked before the run; a file may change since
            if problem is not None:
                self.fail(job, problem)
                continue
            # Masked pixels (NaN, inf) go in as 0, as the shards' `zero` policy stores them,
            # and come out masked: the s x s output pixels of each.
            bad: torch.Tensor | None = ~torch.isfinite(x)
            if bad.any():
                x = torch.where(bad, 0.0, x)
            else:
                bad = None
            stats = self.norm.fit(x)
            yield Canvas(self.norm.apply(x, stats), self.scale, self.tiling,
                         (job, like, stats, bad))  # fmt: skip

    def run(self, jobs: list[Job], out: Path, bar: tqdm) -> int:
        """Write the output of every job; the number written (failures in `self.failed`)."""
        written = 0
        for canvas in assemble(self.canvases(jobs), self.forward, self.batch):
            job, like, stats, bad = canvas.tag
            y = canvas.result()
            if self.norm.bounded:  # the model's values are known to lie in [0, 1]
                y = y.clamp(0.0, 1.0)
            y = self.norm.invert(y, stats)
            if bad is not None:
                s = self.scale
                y[bad.repeat_interleave(s, -2).repeat_interleave(s, -1)] = float("nan")
            if self._write(job, y, like, out):
                written += 1
            bar.update()
        return written

    def _write(self, job: Job, y: torch.Tensor, like: Like, out: Path) -> bool:
        path = out / job.name
        try:
            data = encode(y.numpy(), like, self.scale)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except (OSError, ValueError) as err:
            self.fail(job, f"cannot write {path}: {err}")
            return False
        logger.debug("rank %d wrote %s", self.engine.rank, path)
        return True


RECORD = ".predict.json"  # in an output folder: the model and settings its outputs come from


def settings(
    target: Target, model: torch.nn.Module, fit: Fit, tiling: Tiling, args: Any
) -> dict[str, Any]:
    """What an output depends on besides its input: the weights (a digest of every tensor, so
    a run trained further is another model), the normalisation, the tiling and the precision."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"source": str(target.source), "weights": digest.hexdigest()[:16],
            "normalise": str(fit.norm), "tile": tiling.tile, "overlap": tiling.overlap,
            "shifts": tiling.shifts, "precision": args.precision}  # fmt: skip


def check_record(out: Path, made: dict[str, Any]) -> bool:
    """Whether `out` already records the prediction `made` (False: none recorded); a user error
    where it holds the outputs of another model or other settings, which a rerun would
    otherwise count as done."""
    path = out / RECORD
    if not path.is_file():
        return False
    try:
        then = json.loads(path.read_text())
    except ValueError:
        then = None
    if not isinstance(then, dict):
        raise UserError(f"{path}: unreadable, so what the outputs in {out} come from is unknown: "
                        "give another --out, or remove the folder to predict again")  # fmt: skip
    for key, value in made.items():
        if key != "source" and then.get(key) != value:
            what = "weights" if key == "weights" else f"{key} {then.get(key)}, here {value}"
            raise UserError(
                f"{out}: holds the outputs of another prediction ({what}; {RECORD} says it "
                f"came from {then.get('source')}): give another --out, or remove {out} to "
                "predict again"
            )
    return True


def _hold(out: Path, made: dict[str, Any]) -> Any:
    """The output folder, made and held (`toolkit/runs/hold.py`), cleared of what a killed writer
    left half-written, with the record of what its outputs come from."""
    hold = acquire(out, "predict")  # makes the folder
    try:
        if not check_record(out, made):
            write_atomic(out / RECORD, json.dumps(made, indent=2) + "\n")
    except BaseException:
        hold.release()
        raise
    for tmp in out.rglob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
    return hold


def _plan(
    inputs: list[str], out: Path, hdu: str | None, split: str | None, storage: StorageConfig
) -> tuple[int, list]:
    """(all jobs, those without an output yet); shards at a URL are reached as the run's recipe
    says (`data.storage_options`)."""
    jobs = list_jobs(inputs, hdu, split, out, storage)
    return len(jobs), [j for j in jobs if not (out / j.name).is_file()]


def predict(target: Target, args: Any) -> int:
    """This process's share of the prediction; the exit status (collective on several)."""
    from toolkit.engine.accel import Engine

    r, out = target.recipe, Path(args.out)
    tiling = tiling_for(r, args.tile, args.overlap, args.shifts)
    fit = fit_of(target, tiling, args.normalise)
    precision = "bf16" if args.precision == "bf16" else "no"
    engine = Engine(dataclasses.replace(r.train, precision=precision, grad_accum=1), None, 1)
    hold = None
    try:
        # One listing, then every input to be written checked against the run, each process
        # its share: what does not fit stops the job before anything is written.
        total, todo = engine.on_main(
            lambda: _plan(args.inputs, out, args.hdu, args.split, r.data.storage_options)
        )
        if _LAUNCHED not in os.environ:  # else the launcher has checked them
            found = engine.gather(fit.refusal(share(todo, engine.rank, engine.world_size)))
            engine.on_main(lambda: refuse_misfits([p for part in found or [] for p in part]))
        model = load_model(target)
        made = engine.on_main(lambda: settings(target, model, fit, tiling, args))
        hold = engine.on_main(lambda: _hold(out, made), share=False)  # one holder of the folder
        todo = engine.broadcast([j for j in todo if not (out / j.name).is_file()])
        mine = share(todo, engine.rank, engine.world_size)
        model = model.to(engine.device)
        predictor = Predictor(model, fit, tiling, engine, args.batch)
        start = time.perf_counter()
        bar = tqdm(total=len(mine), unit="file", file=sys.stderr,
                   desc="predict" if engine.world_size == 1 else "predict, rank 0",
                   disable=not (engine.is_main and sys.stderr.isatty()))  # fmt: skip
        with bar:
            written = predictor.run(mine, out, bar)
        results = engine.gather((written, predictor.failed))
        procs = engine.world_size
    except BaseException:
        engine.abandon()  # no barrier: the other ranks may be waiting in a gather instead
        raise
    finally:
        if hold is not None:
            hold.release()
    engine.close(model)
    if results is None:  # not the main process
        return 0
    done = sum(w for w, _ in results)
    failed = [line for _, f in results for line in f]
    logger.info(
        "predict: %d of %d files written to %s (%d before) in %.1f s on %d process(es), %s",
        done, total, out, total - len(todo), time.perf_counter() - start,
        procs, f"{len(failed)} failed" if failed else "none failed",
    )  # fmt: skip
    if failed and _LAUNCHED not in os.environ:
        raise UserError(f"{len(failed)} of {len(todo)} files failed (each named above), first: "
                        f"{failed[0]}; the others are written")  # fmt: skip
    return 0


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m toolkit.predict", description=__doc__.splitlines()[0],
                           allow_abbrev=False)  # fmt: skip
    p.add_argument("source", help="run directory, checkpoint directory or .safetensors file")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or shard dirs")
    p.add_argument("--out", required=True, help="folder the outputs are written to")
    p.add_argument("--tile", type=int, help="LR tile side (default: the model's input size, "
                   "or whole images for fully convolutional models)")  # fmt: skip
    p.add_argument("--overlap", type=int, help="LR pixels shared by neighbouring tiles "
                   "(default: a quarter of the tile)")  # fmt: skip
    p.add_argument("--shifts", type=int, help="tilings averaged, each offset by a fraction of "
                   "a step (default 2 for fixed-size models such as SR-MAE, else 1)")  # fmt: skip
    p.add_argument("--batch", type=int, default=8, help="tiles per forward (default 8)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--normalise", metavar="NAME[:P,...]", help="map the inputs with this "
                   "normalisation (minmax, percentile[:lo,hi], asinh[:soft], unit, none) instead "
                   "of the run's, and the outputs back to the inputs' units")  # fmt: skip
    p.add_argument("--hdu", help="FITS: the HDU to read (EXTNAME or index; default: the first "
                   "holding an image)")  # fmt: skip
    p.add_argument("--split", choices=("train", "val"), help="shard dirs: only this split")
    p.add_argument("--local", action="store_true", help="run here, on --procs processes")
    p.add_argument("--procs", type=int, default=1, help="processes for --local (default 1)")
    args = p.parse_intermixed_args(argv)
    if args.procs < 1 or (args.procs > 1 and not args.local):
        raise UserError("--procs P needs --local and P >= 1")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: expected 1 or more")
    target = locate(args.source)
    if target.task.name != "sr":
        raise UserError(f"{args.source}: a {target.task.name} run; predict needs an sr run")
    tiling = tiling_for(target.recipe, args.tile, args.overlap, args.shifts)  # stops here
    fit = fit_of(target, tiling, args.normalise)
    out = Path(args.out)
    if args.local and args.procs > 1 and "RANK" not in os.environ:  # not inside a group yet
        _, todo = _plan(
            args.inputs, out, args.hdu, args.split, target.recipe.data.storage_options
        )  # bad inputs stop here
        refuse_misfits(fit.refusal(todo))
        refuse_if_held(out)
        check_record(out, settings(target, load_model(target), fit, tiling, args))
        os.environ[_LAUNCHED] = "1"
        try:
            rc = env.torchrun(args.procs, "toolkit.predict", _child_args(args))
        finally:
            del os.environ[_LAUNCHED]
        if rc:
            return rc
        missing = [j for j in todo if not (out / j.name).is_file()]
        if missing:
            raise UserError(f"{len(missing)} of {len(todo)} files have no output in {out} (each "
                            "named above); rerun to retry them")  # fmt: skip
        return 0
    env.bind_to_launcher()  # a torchrun worker ends with its torchrun
    env.setup()  # an srun task: ranks from its SLURM_* variables
    return predict(target, args)


def _child_args(args: Any) -> list[str]:
    """The command line of each process `--local --procs P` starts."""
    options = {"--out": args.out, "--tile": args.tile, "--overlap": args.overlap,
               "--shifts": args.shifts, "--batch": args.batch, "--precision": args.precision,
               "--hdu": args.hdu, "--split": args.split,
               "--normalise": args.normalise}  # fmt: skip
    flags = [f"{k}={v}" for k, v in options.items() if v is not None]
    return [args.source, *args.inputs, *flags]


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
