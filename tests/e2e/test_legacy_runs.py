"""Run directories and checkpoints written before tasks and architectures existed (`stage:`
recipes, tests/fixtures/legacy) still evaluate to the numbers they recorded, report, and
resume training from their checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import make_pairs, read_jsonl
from toolkit import evaluate, launch, report
from toolkit.shard import shard

pytestmark = pytest.mark.slow

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"


@pytest.fixture
def legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The legacy runs under runs/, and the data they were trained on (remade: it is
    deterministic) under data/, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    for run in ("pre", "fine"):
        shutil.copytree(LEGACY / run, tmp_path / "runs" / run)
    make_pairs(Path("data/src"), 24, size=16, seed=0)
    shard("data/src", "data/shards", val_fraction=0.25, shard_size=8)
    return tmp_path


def recorded(run: str) -> dict:
    return json.loads((LEGACY / run / "eval.json").read_text())


def test_legacy_runs_evaluate_to_what_they_recorded(legacy: Path, capsys) -> None:
    for run in ("fine", "pre"):
        assert evaluate.main([f"runs/{run}", "--json"]) == 0
        now = json.loads(capsys.readouterr().out)
        then = recorded(run)
        assert now["count"] == then["count"] and now["task"] == ("sr" if run == "fine" else "mae")
        assert now["model"] == pytest.approx(then["model"], rel=1e-9)
        if run == "fine":
            assert now["bicubic"] == pytest.approx(then["bicubic"], rel=1e-9)


def test_legacy_runs_report(legacy: Path) -> None:
    assert report.main(["runs/pre", "runs/fine", "--out", "rep"]) == 0
    mae, sr = json.loads(Path("rep/results.json").read_text())["tables"]
    assert [r["mode"] for r in mae["rows"]] == ["MAE"]
    assert [r["mode"] for r in sr["rows"]] == ["SR-MAE, frozen encoder", "bicubic"]
    assert sr["rows"][0]["psnr"] == recorded("fine")["model"]["psnr"]
    assert sr["rows"][1]["psnr"] == recorded("fine")["bicubic"]["psnr"]


def test_a_legacy_checkpoint_resumes(legacy: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    assert launch.main(["runs/fine/recipe.yaml", "--local", "train.max_steps=6"]) == 0
    assert "resumed from runs/fine/checkpoints/step-00000004" in caplog.text
    assert "stage finetune is read as task sr, model.arch srmae" in caplog.text
    steps = [x["step"] for x in read_jsonl(Path("runs/fine/metrics.jsonl")) if "train/loss" in x]
    assert steps == [1, 2, 3, 4, 5, 6]
    ev = json.loads(Path("runs/fine/eval.json").read_text())
    assert ev["task"] == "sr" and ev["model"] != recorded("fine")["model"]  # two more steps
