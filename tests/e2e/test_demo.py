"""The demo, the README's main command, end to end at a tiny size: data, ten runs, tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit import demo

pytestmark = pytest.mark.slow

RUNS = ("pretrain", "finetune_frozen_mae", "finetune_frozen_encoder", "finetune",
        "finetune_scratch", "edsr", "rcan")  # fmt: skip
CLASSIFIERS = ("classify_cnn", "classify_probe", "classify_finetune")
ARGS = ["--count", "30", "--classes", "60", "--workers", "1", "--max-steps", "2"]


def modes(out: str) -> list[str]:
    """The row names of the results tables (not those of the paired differences below them)."""
    names, in_results = [], False
    for line in out.splitlines():
        if not line.startswith("|"):
            in_results = False  # a table ends at its first line that is not a row
        elif line.startswith("| Mode |"):
            in_results = True
        elif in_results and line.startswith("| "):
            names.append(line.split("|")[1].split(" (`")[0].strip())
    return names


def test_demo_runs_every_stage_and_writes_the_report(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("lenstronomy")
    monkeypatch.chdir(tmp_path)
    assert demo.main(ARGS) == 0
    out = capsys.readouterr().out
    assert modes(out) == [
        "MAE pretrain",  # the pretraining's own table, then the SR table
        "frozen MAE", "frozen encoder", "full finetune", "full from scratch", "EDSR", "RCAN",
        "bicubic",
        "CNN from scratch", "linear probe", "full finetune",  # the classification table
    ]  # fmt: skip
    assert "### super-resolution (`sr`)" in out
    # below the SR and the classification tables (the MAE table has one run: nothing to pair)
    assert out.count("Paired differences on the same images") == 2
    full = json.loads(Path("runs/demo/finetune/eval.json").read_text())
    row = next(line for line in out.splitlines() if line.startswith("| full finetune (`finetune`"))
    assert f"{full['model']['psnr']:.2f}" in row
    report = Path("runs/demo/report")
    saved = (report / "results.md").read_text()
    assert modes(saved) == modes(out)
    for run in RUNS:
        assert (report / f"loss_{run}.png").is_file() and (report / f"samples_{run}.png").is_file()
    for run in CLASSIFIERS:
        assert (report / f"loss_{run}.png").is_file() and (report / f"roc_{run}.png").is_file()
    assert (report / "compare.png").is_file() and (report / "compare_classify.png").is_file()
    doc = json.loads((report / "results.json").read_text())
    assert [t["task"] for t in doc["tables"]] == ["mae", "sr", "classify"]
    assert "### classification (`classify`)" in out
    # A second run finds everything done and only writes the report again.
    assert demo.main(ARGS) == 0
    assert modes(capsys.readouterr().out) == modes(out)
