"""The demo, the README's main command, end to end at a tiny size: data, four stages, table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit import demo

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_prints_the_table(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("lenstronomy")
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--count", "30", "--workers", "1", "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "frozen MAE", "frozen encoder", "full finetune", "bicubic",
    ]  # fmt: skip
    full = json.loads(Path("runs/demo/finetune/eval.json").read_text())
    assert f"{full['model']['psnr']:.2f}" in rows[3]
    saved = Path("runs/demo/results.md").read_text().splitlines()
    assert [line for line in saved if line.startswith("| ")] == rows
    # A second run finds everything done and only prints the table again.
    assert demo.main(["--count", "30", "--workers", "1", "--max-steps", "2"]) == 0
    assert "| bicubic |" in capsys.readouterr().out
