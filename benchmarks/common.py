"""What every benchmark shares: median timing and the table + JSON report."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


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


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def report(title: str, rows: Sequence[dict[str, Any]], out: str | Path, **meta: Any) -> None:
    """Print `rows` as an aligned table on stdout and write {"meta", "rows"} as JSON to `out`."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    sys.stdout.write("\n".join(lines) + "\n")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": title, **meta, "rows": list(rows)}, indent=2) + "\n")
    sys.stdout.write(f"wrote {path}\n")
