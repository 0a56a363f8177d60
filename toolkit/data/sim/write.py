"""Simulated samples written in parallel: LR/HR pairs with their metadata (`lensing`) or labelled
images (`substructure`), chunks of keys to a pool of processes; sample i depends only on
(seed, i)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from toolkit.core.errors import UserError
from toolkit.data.sim import lensing, substructure

logger = logging.getLogger(__name__)


def check_args(
    out: str | Path, count: int, seed: int = 0, workers: int = 1, overwrite: bool = False
) -> None:
    """Raise UserError, naming what was expected, for arguments ``generate`` refuses."""
    out = Path(out)
    if count < 1:
        raise UserError(f"--count: expected a positive integer, got {count}")
    if workers < 1:
        raise UserError(f"--workers: expected a positive integer, got {workers}")
    if seed < 0:
        raise UserError(f"--seed: expected a non-negative integer, got {seed}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: expected a folder for the output, found a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: expected an empty or new folder (or pass --overwrite)")
    try:
        lensing.require_lenstronomy()
    except ImportError as exc:
        raise UserError(lensing.MISSING) from exc


def generate(
    out: str | Path,
    count: int,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    classes: bool = False,
) -> int:
    """Write ``count`` pairs under ``out/hr`` and ``out/lr``, each with its degradation in
    ``out/meta/<key>.json`` (see ``toolkit.data.sim.lensing``; ``classes``: ``count`` labelled
    images under ``out/<class>/``, see ``toolkit.data.sim.substructure``); return the number
    written.

    Sample ``i`` depends only on ``(seed, i)``; ``overwrite`` replaces samples of the same keys
    and leaves other files alone. Raises UserError for what ``check_args`` refuses.
    """
    out = Path(out)
    check_args(out, count, seed, workers, overwrite)
    for side in substructure.CLASSES if classes else ("hr", "lr", "meta"):
        (out / side).mkdir(parents=True, exist_ok=True)

    # Chunks of contiguous indices: big enough to amortise the hand-off to a process, small
    # enough (4 a worker at least) to balance the load and report progress.
    size = max(1, min(64, -(-count // (4 * workers))))
    starts = list(range(0, count, size))
    stops = [min(a + size, count) for a in starts]
    write = partial(substructure.write_range if classes else lensing.write_range, out, seed)
    started, done = time.perf_counter(), 0
    executor = None
    if workers == 1:  # in-process: simpler to debug and profile
        results = map(write, starts, stops)
    else:
        executor = ProcessPoolExecutor(max_workers=min(workers, len(starts)))
        results = executor.map(write, starts, stops)
    try:
        for n in results:
            done += n
            logger.info("%d/%d pairs", done, count)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    elapsed = time.perf_counter() - started
    logger.info(
        "wrote %d %s to %s (seed %d, %d worker(s)) in %.1f s: %.1f ms each",
        done,
        "labelled images" if classes else "LR/HR pairs",
        out,
        seed,
        workers,
        elapsed,
        1000 * elapsed / done,
    )
    return done
