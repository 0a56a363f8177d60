"""Regenerate benchmarks/RESULTS.md's tables: run the benchmarks, then rewrite each one's block
from its JSON, stamped with the commit, machine and torch it was measured with.

    python -m benchmarks.results                     # every benchmark whose inputs are here
    python -m benchmarks.results --only data,engine  # some of them
    python -m benchmarks.results --render            # no runs: the blocks from the JSON there is
    python -m benchmarks.results --tiny --results-dir /tmp/r --markdown /tmp/R.md  # the tests'

A block is the text between `<!-- results: NAME -->` and `<!-- /results: NAME -->` in the
markdown; everything outside the blocks (the setup and what the numbers mean) is written by
hand and left as it is. A benchmark whose inputs are missing (the demo's runs or data, a GPU)
is not run and its block is kept, and said so; a benchmark that fails keeps its block too, and
the command exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import cell

logger = logging.getLogger("benchmarks.results")
ROOT = Path(__file__).resolve().parents[1]


def _missing(*paths: str) -> Callable[[], str | None]:
    """What a full run lacks, of the paths (from the repository root) it reads."""

    def check() -> str | None:
        absent = [p for p in paths if not (ROOT / p).exists()]
        return f"needs {', '.join(absent)} (make demo)" if absent else None

    return check


def _no_gpu() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a GPU (bash benchmarks/gpu.sh there)"


@dataclass(frozen=True)
class Bench:
    """One benchmark: how a full run is started, what it needs, the columns of its table."""

    command: list[str]
    columns: list[str] | None = None  # None: every column its rows have
    needs: Callable[[], str | None] = field(default=lambda: None)
    tiny: list[str] = field(default_factory=lambda: ["--tiny"])


BENCHMARKS: dict[str, Bench] = {
    "data": Bench(["-m", "benchmarks.data"]),
    "engine": Bench(["-m", "benchmarks.engine"]),
    "throughput": Bench(
        ["-m", "benchmarks.throughput"],
        needs=_missing(
            "data/demo/shards",
            "data/demo/mae-shards",
            "data/demo/class-shards",
            "runs/demo/pretrain",
        ),
    ),
    "model": Bench(["-m", "benchmarks.model"]),
    "zero": Bench(["-m", "benchmarks.zero"]),
    "scale": Bench(["-m", "benchmarks.scale"]),
    "bootstrap": Bench(["-m", "benchmarks.bootstrap"]),
    "storage": Bench(["-m", "benchmarks.storage"]),
    "predict": Bench(
        ["-m", "benchmarks.predict"],
        needs=_missing("runs/demo/finetune", "runs/demo/edsr", "data/demo/raw"),
    ),
    "ceiling": Bench(["-m", "benchmarks.ceiling"], needs=_missing("data/demo/shards")),
    "gpu": Bench(
        ["benchmarks/gpu.sh"],
        columns=[
            "config",
            "status",
            "images_per_s",
            "spread",
            "data_wait_share",
            "peak_memory_gb",
            "train_gflops_per_image",
            "mfu",
            "seconds",
        ],
        needs=_no_gpu,
        tiny=["--cpu-smoke"],
    ),
}


def run(name: str, out: Path, tiny: bool) -> bool:
    """Run one benchmark into `out` (its JSON); False when it failed."""
    bench = BENCHMARKS[name]
    args = bench.tiny if tiny else []
    if bench.command[0].endswith(".sh"):  # the GPU check: a folder of results, OUT in the env
        cmd, env = ["bash", *bench.command, *args], {"OUT": str(out.parent / name)}
    else:
        cmd, env = [sys.executable, *bench.command, *args, "--out", str(out)], {}
    logger.info("running %s", " ".join(cmd))
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env})
    if bench.command[0].endswith(".sh") and (out.parent / name / "gpu.json").is_file():
        out.write_bytes((out.parent / name / "gpu.json").read_bytes())
    if done.returncode:
        logger.error("%s exited with %d", name, done.returncode)
    return done.returncode == 0


def render(name: str, doc: dict[str, Any]) -> str:
    """The block of one benchmark: its stamp, title and table."""
    s = doc.get("stamp", {})
    stamp = " · ".join(str(s.get(k, "?")) for k in ("commit", "machine", "torch", "date"))
    rows = doc["rows"] if "rows" in doc else doc["configs"]  # the GPU check's: configurations
    columns = BENCHMARKS[name].columns or list(
        dict.fromkeys(k for row in rows for k, v in row.items() if not isinstance(v, dict | list))
    )
    lines = [f"`python -m benchmarks.results --only {name}` · {stamp}", "", doc["title"], "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]  # fmt: skip
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    if "summary" in doc:  # the GPU check's verdict and checks
        lines += ["", *(f"- {k}: {'ok' if v else 'FAILED'}" for k, v in doc["checks"].items())]
        lines += ["", f"**{doc['summary']}** (exit {doc['exit']})"]
    return "\n".join(lines)


def replace_block(text: str, name: str, block: str) -> str:
    """`text` with the block of `name` replaced by `block`; a KeyError if it has none."""
    pattern = re.compile(
        rf"(<!-- results: {name} -->\n)(?:.*?\n)?(<!-- /results: {name} -->)", re.S
    )
    if not pattern.search(text):
        raise KeyError(name)
    return pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    p.add_argument("--render", action="store_true", help="no runs: render the JSON there is")
    p.add_argument("--tiny", action="store_true", help="each benchmark at its tiny size")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(
            f"unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(BENCHMARKS)}"
        )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    text, ok = args.markdown.read_text(), True
    for name in names:
        out = args.results_dir / f"{name}.json"
        if not args.render:
            lacking = None if args.tiny else BENCHMARKS[name].needs()
            if lacking:
                logger.warning("%s: not run, its block kept: %s", name, lacking)
                continue
            if not run(name, out, args.tiny):
                ok = False
                continue
        if not out.is_file():
            logger.warning("%s: no %s, its block kept", name, out)
            continue
        try:
            text = replace_block(text, name, render(name, json.loads(out.read_text())))
        except KeyError:
            logger.error(
                "%s has no block for %s: add <!-- results: %s --> and its end",
                args.markdown,
                name,
                name,
            )
            ok = False
    args.markdown.write_text(text)
    logger.info("wrote %s", args.markdown)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
