"""`launch --sweep ... --local`: every variant trained in turn in its own run directory, and the
report of the sweep's directory: one row per swept value, mean and std over the seeds."""

from __future__ import annotations

import json
import statistics

import pytest

from tests.helpers import DEBUG_RECIPE, hparams_of, make_pairs, tiny
from toolkit import launch
from toolkit.data.sharding import shard
from toolkit.reporting import write
from toolkit.runs import recipe

pytestmark = pytest.mark.slow


def test_a_local_sweep_trains_every_variant_and_the_report_averages_seeds(tmp_path, capsys):
    make_pairs(tmp_path / "src", 24)
    shard(tmp_path / "src", tmp_path / "shards", val_fraction=0.25, seed=0)
    base = tmp_path / "sweep"
    args = [str(DEBUG_RECIPE), *tiny(tmp_path / "shards", base, task="mae"), "train.max_steps=6",
            "--sweep", "optim.lr=1e-3,1e-2", "--sweep", "train.seed=0,1,2", "--local"]  # fmt: skip
    assert launch.main(args) == 0
    assert "python -m toolkit.report" in capsys.readouterr().out
    record = json.loads((base / "sweep.json").read_text())
    assert len(record["variants"]) == 6
    losses: dict[str, list[float]] = {}
    for v in record["variants"]:
        run_dir = base / v["name"]
        r = recipe.load(run_dir / "recipe.yaml")
        lr, seed = (o.split("=")[1] for o in v["overrides"])
        assert (r.optim.lr, r.train.seed, r.run_dir) == (float(lr), int(seed), run_dir)
        assert (run_dir / "model.safetensors").is_file()
        loss = json.loads((run_dir / "eval.json").read_text())["model"]["loss"]
        losses.setdefault(f"optim.lr={lr}", []).append(loss)
    assert len({x for v in losses.values() for x in v}) == 6  # seeds and rates differ
    doc = write.report([base], tmp_path / "report", samples=1)
    rows = {row["run"]: row for row in doc["tables"][0]["rows"]}
    assert set(rows) == set(losses)  # one row per learning rate, the seeds folded in
    for name, values in losses.items():
        assert rows[name]["n"] == 3
        assert rows[name]["loss"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert rows[name]["loss_std"] == pytest.approx(statistics.stdev(values), rel=1e-9)
    md = (tmp_path / "report" / "results.md").read_text()
    assert "`optim.lr=1e-3`, 3 seeds" in md and " ± " in md
    # the rate is a number: the loss against it, one line, each point the mean of its seeds
    (curve,) = doc["curves"]
    assert (curve["key"], curve["x"]) == ("optim.lr", [1e-3, 1e-2])
    (line,) = curve["lines"]
    assert [p["mean"] for p in line["points"]] == pytest.approx(
        [statistics.mean(losses["optim.lr=1e-3"]), statistics.mean(losses["optim.lr=1e-2"])],
        rel=1e-12,
    )
    assert (tmp_path / "report" / curve["png"]).is_file()
    # each variant's swept values and final loss on TensorBoard's HParams dashboard
    for v in record["variants"]:
        values, metric_tags, scalars = hparams_of(base / v["name"] / "tb")
        lr, seed = (o.split("=")[1] for o in v["overrides"])
        assert values == {"optim.lr": float(lr), "train.seed": float(seed)}
        assert "eval/loss" in metric_tags
        loss = json.loads((base / v["name"] / "eval.json").read_text())["model"]["loss"]
        assert scalars["eval/loss"] == [pytest.approx(loss, rel=1e-6)]  # stored as float32
