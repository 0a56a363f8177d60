"""The label-efficiency study in miniature, end to end on CPU: labelled shards, a tiny MAE
pretraining, then one sweep of 2 modes (a ViT from scratch, a full finetune from that MAE) x 2
labelled subset sizes x 2 seeds, trained in turn, and the report's curve over data.per_class:
one line per mode, each point the mean of the seeds' eval.json accuracies computed here."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.e2e.test_classify import labelled
from tests.helpers import DEBUG_RECIPE, ROOT
from toolkit import launch, report
from toolkit.data.sharding import shard
from toolkit.runs import recipe

pytestmark = pytest.mark.slow
CLASSIFY = ROOT / "recipes" / "classify"
# One tiny ViT for the MAE and the classifiers, so the finetune loads the MAE's encoder.
VIT = ("model.img_size=32", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
       "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
       "model.decoder_num_heads=2")  # fmt: skip
CPU = ("data.batch_size=8", "data.num_workers=0", "train.precision=no", "deepspeed=null",
       "train.log_every=1", "train.eval_every=0")  # fmt: skip


def test_the_study_in_miniature_draws_one_line_per_mode(tmp_path: Path, capsys) -> None:
    shards = tmp_path / "shards"
    shard(labelled(tmp_path / "src", per_class=30), shards, val_fraction=0.3, seed=0, labels=True)
    pretrain = tmp_path / "pretrain"
    # The MAE on the labelled shards' images: it reads the image, never the class.
    assert launch.main([str(DEBUG_RECIPE), f"data.shards={shards}", f"run.dir={pretrain}",
                        *VIT, *CPU, "train.max_steps=4", "--local"]) == 0  # fmt: skip
    # The modes differ in more than one key (init.from here): each its own recipe file.
    (tmp_path / "scratch.yaml").write_text(f"extends: {CLASSIFY / 'scratch.yaml'}\n")
    (tmp_path / "finetune.yaml").write_text(
        f"extends: {CLASSIFY / 'finetune.yaml'}\ninit: {{from: '{pretrain}'}}\n"
    )
    (tmp_path / "study.yaml").write_text(
        "sweep:\n"
        f"  recipe: ['{tmp_path / 'scratch.yaml'}', '{tmp_path / 'finetune.yaml'}']\n"
        "  data.per_class: [5, 10]\n"
        "  train.seed: [0, 1]\n"
    )
    base = tmp_path / "study"
    # Equal optimiser steps for every size, on a schedule counted in steps.
    code = launch.main(["--sweep", str(tmp_path / "study.yaml"), f"data.shards={shards}",
                        f"run.dir={base}", *VIT, *CPU, "train.max_steps=4",
                        "optim.scheduler={name: constant}", "--local"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads((base / "sweep.json").read_text())
    assert len(record["variants"]) == 8
    # The oracle: each variant's accuracy from its own eval.json, averaged over seeds here.
    accuracy: dict[tuple[str, int], list[float]] = {}
    for v in record["variants"]:
        mode = v["name"].split(",")[0].removeprefix("recipe=")
        n = int(v["name"].split(",")[1].removeprefix("data.per_class="))
        ev = json.loads((base / v["name"] / "eval.json").read_text())
        accuracy.setdefault((mode, n), []).append(ev["model"]["accuracy"])
    assert sorted(accuracy) == [("finetune", 5), ("finetune", 10), ("scratch", 5), ("scratch", 10)]
    assert all(len(seeds) == 2 for seeds in accuracy.values())
    out = tmp_path / "report"
    assert report.main([str(base), "--out", str(out), "--samples", "1"]) == 0
    doc = json.loads((out / "results.json").read_text())
    (curve,) = [c for c in doc["curves"] if c["metric"] == "accuracy"]
    assert (curve["key"], curve["x"]) == ("data.per_class", [5, 10])
    lines = {line["label"]: line["points"] for line in curve["lines"]}
    assert set(lines) == {"recipe=scratch", "recipe=finetune"}
    for label, points in lines.items():
        mode = label.removeprefix("recipe=")
        assert [p["x"] for p in points] == [5, 10]
        assert [p["n_seeds"] for p in points] == [2, 2]
        assert [p["mean"] for p in points] == pytest.approx(
            [statistics.mean(accuracy[(mode, n)]) for n in (5, 10)], rel=1e-12
        )
    # Each mode trained its own file: the finetune from the MAE, the scratch run from nothing.
    for mode, source in (("finetune", str(pretrain)), ("scratch", None)):
        run = recipe.load(base / f"recipe={mode},data.per_class=5,train.seed=0" / "recipe.yaml")
        assert run.init.from_ == source
