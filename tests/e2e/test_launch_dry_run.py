"""The launch CLI's dry run and its user errors, run in-process and once as a real subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli, run_main
from toolkit import launch

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = str(ROOT / "recipes/pretrain.yaml")
FINETUNE = str(ROOT / "recipes/finetune.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_main(capsys, launch.main, *argv)


def test_dry_run_json_shows_the_workload_optimiser(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no shards here: the dry run warns instead of failing
    code, out, _ = run(capsys, PRETRAIN, "--dry-run", "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"recipe", "params", "world", "sbatch", "warnings"}
    optim = doc["recipe"]["optim"]
    assert optim["lr"] == 5e-4 and optim["groups"][0]["lr"] == 8e-5
    assert optim["scheduler"] == {
        "name": "cosine_warm_restarts",
        "T_0": 10,
        "T_mult": 1,
        "eta_min": 8e-5,
        "warmup_steps": 0,
    }
    assert doc["world"] == {"nodes": 1, "gpus_per_node": 8, "world_size": 8}
    assert doc["sbatch"].startswith("#!") and "#SBATCH --nodes=1" in doc["sbatch"]
    assert any(w.startswith("data.shards:") for w in doc["warnings"])


def test_dry_run_world_from_flags_and_local(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, out, _ = run(capsys, PRETRAIN, "--nodes", "4", "--gpus-per-node", "2", "--dry-run", "--json")
    assert json.loads(out)["world"] == {"nodes": 4, "gpus_per_node": 2, "world_size": 8}
    _, out, _ = run(capsys, PRETRAIN, "--nodes", "3", "--gpus-per-node", "0", "--dry-run", "--json")
    assert json.loads(out)["world"]["world_size"] == 3  # CPU nodes: one process each
    _, out, _ = run(capsys, PRETRAIN, "--local", "--procs", "2", "--dry-run", "--json")
    assert json.loads(out)["world"] == {"nodes": 1, "gpus_per_node": 2, "world_size": 2}


def test_missing_things_warn_in_dry_run_and_stop_a_real_launch(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, FINETUNE, "train.epochs=3", "--dry-run")
    assert code == 0
    assert "init.from: runs/finetune_frozen_encoder does not exist yet" in out
    assert "train:\n  epochs: 3" in out  # the resolved recipe, override applied
    code, out, err = run(capsys, FINETUNE, "--local")
    assert code == 2 and out == ""
    assert err.startswith("error: data.shards:") and err.count("\n") == 1


def test_init_from_present_gives_no_warning(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/finetune_frozen_encoder").mkdir(parents=True)
    _, out, _ = run(capsys, FINETUNE, "--dry-run", "--json")
    assert not [w for w in json.loads(out)["warnings"] if w.startswith("init.from")]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([PRETRAIN, "optim.lrr=1", "--dry-run"], "did you mean 'optim.lr'"),
        ([PRETRAIN, "--json"], "--json goes with --dry-run"),
        ([PRETRAIN, "--procs", "2"], "--procs goes with --local"),
        ([PRETRAIN, "--local", "--nodes", "2"], "not --local"),
        ([PRETRAIN, "--nodes", "0", "--dry-run"], "--nodes: expected an integer >= 1"),
        ([PRETRAIN, "--bogus"], "unrecognized arguments: --bogus"),
        ([PRETRAIN, "notanoverride", "--dry-run"], "expected key=value"),
        (["missing.yaml", "--dry-run"], "missing.yaml: recipe file not found"),
        # A size with hundreds of digits is refused at once, not built (which would hang).
        ([PRETRAIN, "model.depth=" + "9" * 300, "--dry-run"], "expected an int64"),
        ([PRETRAIN, "model.decoder_depth=100000", "--dry-run"], "expected > 0 and <= 1024"),
        ([PRETRAIN, "train.max_steps=" + "9" * 300, "--dry-run"], "expected an int64"),
        ([PRETRAIN, "--array-limit", "2", "--dry-run"], "--array-limit goes with --sweep"),
        ([PRETRAIN, FINETUNE, "--sweep", "optim.lr=1,2"], "--sweep varies one recipe"),
        ([PRETRAIN, "--sweep", "optim.lrr=1,2", "--dry-run"], "did you mean 'optim.lr'"),
        ([PRETRAIN, "--sweep", "optim.lr=1,x", "--dry-run"], "(override optim.lr=x)"),
    ],
)
def test_user_errors_are_one_line_with_status_2(capsys, argv, needle) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_subprocess_exit_status_and_no_traceback(tmp_path: Path) -> None:
    proc = cli("toolkit.launch", PRETRAIN, "optim.lrr=1", "--dry-run", cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {PRETRAIN} (override optim.lrr=1): optim.lrr: unknown key; "
        "did you mean 'optim.lr'?"
    ]


def test_shards_that_do_not_fit_the_model_are_reported(capsys, tmp_path, monkeypatch) -> None:
    import numpy as np

    from toolkit.data.sharding import shard

    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    for i in range(6):
        np.save(tmp_path / "src" / f"{i}.npy", np.zeros((16, 16, 3), dtype=np.float32))
    shard(tmp_path / "src", tmp_path / "shards", val_fraction=0.0, shard_size=4)
    argv = [PRETRAIN, "data.shards=shards", "--dry-run", "--json"]
    warnings = json.loads(run(capsys, *argv)[1])["warnings"]
    assert any("3-channel images but model.in_chans is 1" in w for w in warnings)
    assert any("smallest image is 16x16, smaller than model.img_size 150" in w for w in warnings)
    code, _, err = run(capsys, PRETRAIN, "data.shards=shards", "--local")
    assert code == 2 and "model.in_chans is 1" in err


@pytest.mark.parametrize(
    ("name", "trainable"),
    [
        ("pretrain", 7.25e6),
        ("finetune_frozen_mae", 167.7e3),
        ("finetune_frozen_encoder", 996e3),
        ("finetune", 7.38e6),
    ],
)
def test_dry_run_counts_params_like_the_workload(capsys, name, trainable) -> None:
    code, out, _ = run(capsys, str(ROOT / f"recipes/{name}.yaml"), "--dry-run", "--json")
    params = json.loads(out)["params"]
    assert code == 0 and abs(params["trainable"] - trainable) / trainable < 0.10
    assert sum(g["params"] for g in params["groups"]) == params["trainable"]
    _, text, _ = run(capsys, str(ROOT / f"recipes/{name}.yaml"), "--dry-run")
    assert "rule" in text and "weight decay" in text and f"{params['trainable']:,}" in text


def test_group_rule_matching_nothing_fails_the_dry_run(capsys) -> None:
    recipe = str(ROOT / "recipes/finetune_frozen_mae.yaml")
    code, _, err = run(
        capsys, recipe, "optim.groups=[{match: '^encoder\\.', lr: 1e-4}]", "--dry-run"
    )
    assert (
        code == 2 and "optim.groups[0]: match '^encoder\\.' matches no trainable parameter" in err
    )


def test_a_sweep_dry_run_lists_every_variant_and_the_array(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, PRETRAIN, "--sweep", "optim.lr=1e-4,3e-4,1e-3", "--sweep",
                       "train.seed=0,1", "run.dir=runs/lr", "--array-limit", "4", "--dry-run",
                       "--json")  # fmt: skip
    assert code == 0
    doc = json.loads(out)
    assert doc["sweep"]["array"] == "0-5%4" and "#SBATCH --array=0-5%4" in doc["sweep"]["sbatch"]
    variants = doc["variants"]
    assert [v["overrides"] for v in variants[:3]] == [
        ["optim.lr=1e-4", "train.seed=0"], ["optim.lr=1e-4", "train.seed=1"],
        ["optim.lr=3e-4", "train.seed=0"],
    ]  # fmt: skip
    assert [v["recipe"]["optim"]["lr"] for v in variants] == [1e-4, 1e-4, 3e-4, 3e-4, 1e-3, 1e-3]
    assert [v["recipe"]["train"]["seed"] for v in variants] == [0, 1] * 3
    dirs = [v["recipe"]["run"]["dir"] for v in variants]
    assert dirs[3] == "runs/lr/optim.lr=3e-4,train.seed=1" and len(set(dirs)) == 6
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    code, out, _ = run(capsys, PRETRAIN, "--sweep", "train.seed=0,1", "--local", "--dry-run")
    assert code == 0 and "2 variant(s) of train.seed (2)" in out and "in turn" in out


@pytest.mark.parametrize(
    ("name", "trainable"),
    [
        # The encoder's blocks: 8 x 789,760; its patch embedding 25,856; the head 256 x 3 + 3.
        ("linear_probe", 771),
        ("partial", 4 * 789_760 + 256 * 2 + 771),
        ("finetune", 8 * 789_760 + 25_856 + 256 * 2 + 771),
        ("scratch", 8 * 789_760 + 25_856 + 256 * 2 + 771),
        ("cnn", 98_019),
    ],
)
def test_the_classify_modes_train_what_they_say(capsys, name, trainable) -> None:
    """Linear probe, partial and full finetune of the MAE encoder, by `freeze` alone."""
    code, out, _ = run(capsys, str(ROOT / f"recipes/classify/{name}.yaml"), "--dry-run", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["recipe"]["task"] == "classify"
    assert doc["params"]["trainable"] == trainable


@pytest.mark.parametrize(
    ("study", "size", "sizes", "modes"),
    [
        ("classify", "data.per_class", [10, 30, 100, 300, 1000],
         {"cnn": ("cnn", None), "scratch": ("vit_classifier", None),
          "probe": ("vit_classifier", "runs/study/classify_pretrain/model.mask_ratio=0.75"),
          "finetune": ("vit_classifier", "runs/study/classify_pretrain/model.mask_ratio=0.75")}),
        ("sr", "data.limit", [100, 300, 1000, 3000, 10000],
         {"srmae_scratch": ("srmae", None),
          "srmae_pretrained": ("srmae", "runs/study/sr_pretrain/model.mask_ratio=0.75"),
          "edsr": ("edsr", None)}),
    ],
)  # fmt: skip
def test_the_study_dry_run_lists_every_variant_after_the_pretraining(
    capsys, monkeypatch, study, size, sizes, modes
) -> None:
    """recipes/studies/<study>/sweep.yaml: sizes x modes x 3 seeds, each variant its mode's
    architecture and encoder, equal optimiser steps, and one array that waits for the
    pretraining job (afterok) given by --after."""
    monkeypatch.chdir(ROOT)  # the sweep file names its recipes from the repository root
    code, out, _ = run(capsys, "--sweep", f"recipes/studies/{study}/sweep.yaml", "--after",
                       "4242", "--dry-run", "--json")  # fmt: skip
    assert code == 0
    doc = json.loads(out)
    count = len(sizes) * len(modes) * 3
    assert len(doc["variants"]) == count == {"classify": 60, "sr": 45}[study]
    assert doc["sweep"]["array"] == f"0-{count - 1}%{count}"
    assert "#SBATCH --dependency=afterok:4242" in doc["sweep"]["sbatch"]
    got = [(v["overrides"][0].rpartition("/")[2].removesuffix(".yaml"),
            sweep_value(v["recipe"], size), v["recipe"]["train"]["seed"],
            v["recipe"]["model"]["arch"], v["recipe"]["init"]["from"],
            v["recipe"]["train"]["max_steps"], v["recipe"]["run"]["dir"])
           for v in doc["variants"]]  # fmt: skip
    expected = [(m, n, s, *modes[m], got[0][5],
                 f"runs/study/{study}/recipe={m},{size}={n},train.seed={s}")
                for m in modes for n in sizes for s in range(3)]  # fmt: skip
    assert got == expected and got[0][5] >= 1000  # one step budget for every variant
    code, out, _ = run(capsys, "--sweep", f"recipes/studies/{study}/sweep.yaml", "--dry-run")
    assert code == 0 and f"sweep: {count} variant(s) of recipe ({len(modes)})" in out


def sweep_value(doc: dict, key: str) -> object:
    section, _, name = key.partition(".")
    return doc[section][name]
