"""What every benchmark shares: median timing and the table + JSON report."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Recipe overrides that shrink the workload's ViT to a few thousand parameters on 32x32 images:
# what a benchmark's `--tiny` run trains, to show in seconds that it works (not how fast).
TINY_VIT = ["model.img_size=32", "model.patch_size=4", "model.embed_dim=32", "model.depth=1",
            "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
            "model.decoder_num_heads=2"]  # fmt: skip


def timed(fn: Callable[[], T], repeats: int, warmup: int = 0) -> tuple[float, T]:
    """Median wall time of `fn` over `repeats` runs (after `warmup` untimed ones), and its result.
    Medians, because this machine is shared and noisy."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result  # type: ignore[return-value]


def alternating(
    cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of every case in each of `repeats` rounds, the cases run one after another
    within a round (after `warmup` untimed rounds): a busy neighbour or a slow spell then slows
    every case of that round alike, and the per-round ratios (`paired`) cancel it out."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired(base: Sequence[float], ours: Sequence[float]) -> dict[str, float]:
    """The ratio base / ours of each round of `alternating` (above 1: ours is faster): its median
    and its spread (the lowest and highest round), with the median seconds of each side."""
    ratios = sorted(b / o for b, o in zip(base, ours, strict=True))
    return {
        "seconds": statistics.median(ours),
        "baseline_s": statistics.median(base),
        "ratio": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "rounds": len(ratios),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _isa() -> str:
    """The widest vector instruction set the CPU has (its kernels round differently)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((isa for isa in ("avx512f", "avx2") if f" {isa}" in flags), "no avx2")


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if done.returncode:
        raise OSError(done.stderr.strip())
    return done.stdout.strip()


def _commit() -> str:
    """The checkout's commit, with `+dirty` where the measured code differs from it."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        # the code and recipes measured, not the results written beside them
        dirty = _git("status", "--porcelain", "--", "toolkit", "recipes", "benchmarks/*.py",
                     "benchmarks/*.sh")  # fmt: skip
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def stamp() -> dict[str, Any]:
    """Where and when a result was measured: the commit, the machine and the torch build."""
    import torch

    return {
        "commit": _commit(),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {_isa()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def report(title: str, rows: Sequence[dict[str, Any]], out: str | Path, **meta: Any) -> None:
    """Print `rows` as an aligned table on stdout and write {"title", meta, "stamp", "rows"} as
    JSON to `out` (`stamp`: the commit and machine it was measured on)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    sys.stdout.write("\n".join(lines) + "\n")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"title": title, **meta, "stamp": stamp(), "rows": list(rows)}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    sys.stdout.write(f"wrote {path}\n")
