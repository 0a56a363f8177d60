"""The demo, the README's main command, end to end at a tiny size: data, four stages, table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit import demo

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_writes_the_report(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("lenstronomy")
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--count", "30", "--workers", "1", "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].split(" (`")[0].strip() for r in rows[1:]] == [
        "MAE pretrain", "frozen MAE", "frozen encoder", "full finetune", "bicubic",
    ]  # fmt: skip
    full = json.loads(Path("runs/demo/finetune/eval.json").read_text())
    assert f"{full['model']['psnr']:.2f}" in rows[4]
    report = Path("runs/demo/report")
    saved = (report / "results.md").read_text().splitlines()
    assert [line for line in saved if line.startswith("| ")] == rows
    for run in ("pretrain", "finetune_frozen_mae", "finetune_frozen_encoder", "finetune"):
        assert (report / f"loss_{run}.png").is_file() and (report / f"samples_{run}.png").is_file()
    assert (report / "compare.png").is_file()
    # A second run finds everything done and only writes the report again.
    assert demo.main(["--count", "30", "--workers", "1", "--max-steps", "2"]) == 0
    assert "| bicubic |" in capsys.readouterr().out
