"""Every benchmark at its tiny size, through `python -m benchmarks.results --tiny`: each writes the
JSON keys and number shapes its RESULTS.md table is made from, and the markdown gets every block
rewritten with the commit and machine it ran on. The numbers themselves are not checked (a
tiny run on a shared machine measures nothing); that the scripts still run and still say the
same things is."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.results import BENCHMARKS
from tests.helpers import run_command

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

# The keys every row of each benchmark has, and the numeric ones among them (finite, >= 0).
RATIO = ["ratio", "ratio_min", "ratio_max"]
EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "data": ({"case", "baseline", "goal", "rounds"},
             {"seconds", "baseline_s", "items_per_s", *RATIO}),
    "engine": ({"what"}, {"seconds"}),
    "throughput": ({"model", "setting", "rounds"}, {"images_per_s", "wall_s", *RATIO}),
    "model": ({"model", "setting", "trainable_params"}, {"median_s", "min_s", "samples_per_s"}),
    "zero": ({"setting"}, set()),
    "scale": (set(), set()),
    "bootstrap": ({"case", "samples", "resamples", "widths"}, {"seconds"}),
    "predict": ({"model"}, set()),
    "ceiling": ({"metric"}, {"noiseless HR"}),
    "gpu": ({"config", "status"}, set()),
    "storage": ({"case"}, set()),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `--tiny` run of every benchmark into a copy of RESULTS.md."""
    pytest.importorskip("lenstronomy")  # the ceiling and the throughput simulate their data
    out = tmp_path_factory.mktemp("bench")
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", out / "RESULTS.md")
    done = run_command(sys.executable, "-m", "benchmarks.results", "--tiny", "--results-dir",
                       str(out / "results"), "--markdown", str(out / "RESULTS.md"), cwd=ROOT,
                       timeout=1500)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value >= 0


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_benchmark_writes_its_table_at_tiny_size(tiny: Path, name: str) -> None:
    doc = json.loads((tiny / "results" / f"{name}.json").read_text())
    assert isinstance(doc["title"], str) and doc["title"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert doc["stamp"]["commit"].split("+")[0] == head
    assert {"machine", "torch", "date"} <= set(doc["stamp"])
    rows = doc["rows"] if name != "gpu" else doc["configs"]
    assert rows, name
    keys, numbers = EXPECTED[name]
    for row in rows:
        assert keys | numbers <= set(row), (name, row)
        assert all(_finite(row[k]) for k in numbers), (name, row)
    if name in ("data", "throughput"):  # the ratios' spread brackets their median
        assert all(r["ratio_min"] <= r["ratio"] <= r["ratio_max"] for r in doc["rows"])
    if name == "storage":  # each loader pass asked for exactly its samples' bytes
        speed = [r for r in rows if "ratio" in r]
        assert len(speed) == 6 and all(r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
                                       for r in speed)  # fmt: skip
        passes = [r for r in rows if r["case"].startswith("loader, ")]
        assert len(passes) == 2
        assert all(r["requested_bytes"] == r["samples_bytes"] > 0 for r in passes)
        assert passes[1]["requested_bytes"] < passes[0]["requested_bytes"]
    if name == "engine":
        step = doc["rows"][0]
        assert step["ratio_min"] <= step["ratio"] <= step["ratio_max"] and step["rounds"] == 2
        assert _finite(step["baseline_s"]) and step["goal"] == 1.03


def test_every_block_of_results_md_is_rewritten_with_its_stamp(tiny: Path) -> None:
    text = (tiny / "RESULTS.md").read_text()
    for name in BENCHMARKS:
        block = re.search(rf"<!-- results: {name} -->\n(.*?)\n<!-- /results: {name} -->", text,
                          re.S)  # fmt: skip
        assert block, name
        first = block.group(1).splitlines()[0]
        assert first.startswith(f"`python -m benchmarks.results --only {name}` · "), first
        assert "| " in block.group(1)  # a table


def test_every_benchmark_script_is_run_by_results_and_checked_here() -> None:
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {
        "__init__", "common", "results"}  # fmt: skip
    assert scripts | {"gpu"} == set(BENCHMARKS) == set(EXPECTED)
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert all(f"<!-- results: {n} -->" in text for n in BENCHMARKS)


def test_the_gpu_checks_cpu_smoke_runs_its_configurations_and_checks(tiny: Path) -> None:
    """`gpu.sh --cpu-smoke`: the versions recorded, every configuration listed with what became
    of it, the smoke's own run with numbers, the resume checks passed, three files written."""
    from benchmarks import gpu

    doc = json.loads((tiny / "results" / "gpu.json").read_text())
    assert {"torch", "cuda", "cudnn", "device", "driver", "python"} <= doc["env"].keys()
    assert doc["env"]["torch"] == torch.__version__
    assert [r["config"] for r in doc["configs"]] == [c.label for c in gpu.CONFIGS]
    ran = [r for r in doc["configs"] if r["status"] == "ok"]
    assert [r["config"] for r in ran] == list(gpu.SMOKE_CONFIGS)
    assert all(r["images_per_s"] > 0 and r["train_gflops_per_image"] > 0 for r in ran)
    assert doc["checks"] == {"resume resumed from the last checkpoint": True,
                             "every logged step logged once": True}  # fmt: skip
    assert doc["ok"] and doc["exit"] == 0
    written = {p.name for p in (tiny / "results" / "gpu").iterdir()}
    assert written == {"gpu.json", "gpu.md", "gpu-logs.tar.gz"}
