"""The demo, the README's main command, end to end at a tiny size: data, eleven runs, tables;
then its label-efficiency study (`--study`), with curves, and the tuning of its classifiers'
learning rates on a holdout (`--tune`)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from toolkit import demo

pytestmark = pytest.mark.slow

RUNS = ("pretrain", "finetune_frozen_mae", "finetune_frozen_encoder", "finetune",
        "finetune_scratch", "edsr", "rcan")  # fmt: skip
CLASSIFIERS = ("classify_cnn", "classify_scratch", "classify_probe", "classify_finetune")
ARGS = ["--count", "30", "--classes", "90", "--unlabelled", "20", "--workers", "1",
        "--max-steps", "2"]  # fmt: skip


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


def count(manifest: Path, split: str) -> int:
    return json.loads(manifest.read_text())["splits"][split]["count"]


def test_the_default_labelled_set_has_600_validation_images() -> None:
    # The split the demo's shard call draws, on the keys its generator writes (class/index):
    # the README's classification table needs at least 600 validation images.
    from toolkit.data.sharding import split_of
    from toolkit.data.sim.substructure import CLASSES

    keys = [f"{CLASSES[i % len(CLASSES)]}/{i:06d}" for i in range(2100)]
    val = [k for k in keys if split_of(k, 0, demo.CLASS_VAL_FRACTION) == "val"]
    assert len(val) >= 600
    # and every class keeps more train images than the study's largest per_class (400)
    for cls in CLASSES:
        train = [k for k in keys if k.startswith(f"{cls}/") and k not in val]
        assert len(train) >= 400, cls


def test_demo_runs_every_stage_and_writes_the_report(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("lenstronomy")
    monkeypatch.chdir(tmp_path)
    assert demo.main(ARGS) == 0
    out = capsys.readouterr().out
    sr_rows = ["frozen MAE", "frozen encoder", "full finetune", "full from scratch", "EDSR",
               "RCAN", "bicubic"]  # fmt: skip
    assert modes(out) == [
        "MAE pretrain",  # the pretraining's own table, then the SR table
        *sr_rows,
        *sr_rows,  # its physics-aware table: a row per SR run and bicubic
        "CNN from scratch", "ViT from scratch", "linear probe", "full finetune",  # classify
    ]  # fmt: skip
    assert "**super-resolution: physics**" in out
    assert "### super-resolution (`sr`)" in out
    # below the SR and the classification tables (the MAE table has one run: nothing to pair)
    assert out.count("Paired differences on the same images") == 2
    full = json.loads(Path("runs/demo/finetune/eval.json").read_text())
    row = next(line for line in out.splitlines() if line.startswith("| full finetune (`finetune`"))
    assert f"{full['model']['psnr']:.2f}" in row
    # The MAE's images: the SR train split's HR images and the unlabelled ones, no SR val image.
    data = Path("data/demo")
    sr_train = count(data / "shards/manifest.json", "train")
    mae = count(data / "mae-shards/manifest.json", "train")
    mae += count(data / "mae-shards/manifest.json", "val")
    assert mae == sr_train + 20
    assert len(list((data / "mae-raw").glob("sr-*.npy"))) == sr_train
    for tar in (data / "shards/val").glob("*.tar"):  # the SR evaluation's images
        with tarfile.open(tar) as members:
            for key in {m.name.split(".")[0] for m in members.getmembers()}:
                assert not (data / "mae-raw" / f"sr-{key}.npy").exists(), key
    # The probe normalises its features; the ViT from scratch starts from nothing.
    from toolkit.runs import recipe

    assert recipe.load("runs/demo/classify_probe/recipe.yaml").model.head_norm is True
    assert recipe.load("runs/demo/classify_scratch/recipe.yaml").init.from_ is None
    report = Path("runs/demo/report")
    saved = (report / "results.md").read_text()
    assert modes(saved) == modes(out)
    for run in RUNS:
        assert (report / f"loss_{run}.png").is_file() and (report / f"samples_{run}.png").is_file()
    for run in CLASSIFIERS:
        assert (report / f"loss_{run}.png").is_file() and (report / f"roc_{run}.png").is_file()
    assert (report / "compare.png").is_file() and (report / "compare_classify.png").is_file()
    assert (report / "spectra.png").is_file()
    doc = json.loads((report / "results.json").read_text())
    assert [t["task"] for t in doc["tables"]] == ["mae", "sr", "classify"]
    (physics,) = doc["tables"][1]["more"]
    assert [row["run"] for row in physics["rows"]] == [*RUNS[1:], None]  # None: bicubic
    # the simulator records each system's PSFs: every SR sample is re-degraded by its own
    assert full["forward_model"] == {"psf": full["count"], "run": 0}
    # each pretrained run against its control from scratch, whichever is best
    paired = {(p["a"], p["b"]) for t in doc["tables"] for p in t["pairs"]}
    assert ("full finetune (`finetune`)", "full from scratch (`finetune_scratch`)") in paired
    assert (
        "full finetune (`classify_finetune`)",
        "ViT from scratch (`classify_scratch`)",
    ) in paired
    assert "### classification (`classify`)" in out
    # A second run finds everything done and only writes the report again.
    assert demo.main(ARGS) == 0
    assert modes(capsys.readouterr().out) == modes(out)

    # The study: on the same data and MAE, a sweep per task at equal steps, and their curves.
    assert demo.main([*ARGS, "--study", "--per-class", "3,6", "--pairs", "5,10"]) == 0
    out = capsys.readouterr().out
    assert "### Curves over the swept values" in out
    doc = json.loads(Path("runs/demo/study-report/results.json").read_text())
    assert sorted(t["task"] for t in doc["tables"]) == ["classify", "sr"]
    classify = {"recipe=cnn", "recipe=scratch", "recipe=finetune"}
    sr = {"recipe=srmae_pretrained", "recipe=srmae_scratch"}
    want = {("accuracy", "data.per_class"): (classify, [3, 6]),
            ("psnr", "data.limit"): (sr, [5, 10])}  # fmt: skip
    for (metric, key), (labels, sizes) in want.items():
        (curve,) = [c for c in doc["curves"] if c["metric"] == metric and c["key"] == key]
        assert curve["x"] == sizes
        assert {line["label"] for line in curve["lines"]} == labels
        for line in curve["lines"]:
            assert [p["x"] for p in line["points"]] == sizes
        assert Path(f"runs/demo/study-report/curve_{key}.png").is_file()
    # at each size, the pretrained mode against the same model from scratch
    paired = {(p["a"], p["b"]) for t in doc["tables"] for p in t["pairs"]}
    sizes = {"data.per_class": (3, 6), "data.limit": (5, 10)}
    for key, (a, b) in demo.STUDY_PAIRS.items():
        for v in sizes[key]:
            assert any(f"(`recipe={a},{key}={v}`)" in x and f"(`recipe={b},{key}={v}`)" in y
                       for x, y in paired), (key, v)  # fmt: skip
    # Equal steps at every size (--max-steps caps them here), each subset the size asked for.
    for name in ("recipe=cnn,data.per_class=3", "recipe=finetune,data.per_class=6"):
        run = recipe.load(Path("runs/demo/study/classify") / name / "recipe.yaml")
        assert run.train.max_steps == 2
    keys = json.loads(Path("runs/demo/study/classify/recipe=cnn,data.per_class=3/subset.json")
                      .read_text())  # fmt: skip
    assert len(keys["keys"] if isinstance(keys, dict) else keys) == 9

    # The tuning: each learning rate of demo.TUNE evaluated on a holdout of the labelled train
    # split (never on the val split the demo reports), one report row each.
    assert demo.main([*ARGS, "--tune"]) == 0
    capsys.readouterr()
    rows = []
    for name in demo.TUNE:
        doc = json.loads(Path(f"runs/demo/tune-report/{Path(name).stem}/results.json").read_text())
        rows += [row for t in doc["tables"] for row in t["rows"] if row["run"]]
    assert len(rows) == sum(len(rates.split(",")) for rates in demo.TUNE.values()) == 6
    assert {row["split"] for row in rows} == {"holdout"}
    train = count(data / "class-shards/manifest.json", "train")
    for run_dir in Path("runs/demo/tune").glob("*/optim.lr=*"):
        held = json.loads((run_dir / "data.json").read_text())["subset"]
        assert held["held_out"] + held["count"] == train
        ev = json.loads((run_dir / "eval.json").read_text())
        assert ev["split"] == "holdout" and ev["count"] == held["held_out"]
        # in the layout the published rates were chosen in, whatever the demo's CNN runs in
        assert recipe.load(run_dir / "recipe.yaml").train.channels_last is False
