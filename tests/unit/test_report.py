"""The results tables: best values by each metric's direction, formatting, missing metrics, one
table per task with its reference row, a sweep's seeds folded into one row (mean, sample std)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.helpers import DEBUG_RECIPE
from toolkit import recipe
from toolkit.report import Run, best, markdown, markdown_all, read_runs, tables

ROOT = Path(__file__).resolve().parents[2]


def row(run: str | None, mode: str, mse: float | None, psnr: float | None, ssim: float | None):
    return {"run": run, "mode": mode, "mse": mse, "psnr": psnr, "ssim": ssim,
            "trainable": 10 if run else None, "epochs": 2.5 if run else None,
            "init_from": "runs/pre" if run else None, "split": "val", "count": 7}  # fmt: skip


ROWS = [
    row("a", "frozen MAE", 0.002, 31.0, 0.95),
    row("b", "full finetune", 0.001, 33.0, 0.94),
    row("c", "EDSR", None, None, None),
    row(None, "bicubic", 0.003, 30.0, 0.96),
]
COLUMNS = ["mse", "psnr", "ssim"]
TABLE = {"task": "sr", "title": "super-resolution", "columns": COLUMNS, "rows": ROWS,
         "best": best(ROWS, COLUMNS)}  # fmt: skip


def test_best_follows_each_metrics_direction_ignoring_missing_values() -> None:
    assert best(ROWS, COLUMNS) == {"mse": 0.001, "psnr": 33.0, "ssim": 0.96}
    losses = [{"loss": 0.5}, {"loss": 0.2}, {"loss": None}]
    assert best(losses, ["loss"]) == {"loss": 0.2}  # a loss is best when lowest


def test_markdown_bolds_each_best_once_and_formats_the_rest() -> None:
    lines = markdown(TABLE).splitlines()
    assert lines[0] == "| Mode | MSE | PSNR (dB) | SSIM | trainable params | epochs | init from |"
    assert lines[2] == "| frozen MAE (`a`) | 0.002000 | 31.00 | 0.9500 | 10 | 2.5 | `pre` |"
    assert (
        lines[3] == "| full finetune (`b`) | **0.001000** | **33.00** | 0.9400 | 10 | 2.5 | `pre` |"
    )
    assert lines[4] == "| EDSR (`c`) | - | - | - | 10 | 2.5 | `pre` |"
    assert lines[5] == "| bicubic | 0.003000 | 30.00 | **0.9600** | - | - | - |"
    assert lines[-1] == "val split, 7 images; bicubic: the reference, on the same inputs."


def run_of(name: str, path: str, ev: dict, overrides: tuple[str, ...] = ()) -> Run:
    r = recipe.load(ROOT / path, list(overrides))
    return Run(Path("runs") / name, r, {"split": "val", "count": 7, **ev}, [{"epoch": 1.0}])


def test_one_table_per_task_each_with_its_reference() -> None:
    ref = {"mse": 0.003, "psnr": 30.0, "ssim": 0.9}
    runs = [
        run_of("pre", "recipes/pretrain.yaml", {"model": {"loss": 0.4}, "bicubic": None}),
        run_of(
            "edsr",
            "recipes/baselines/edsr.yaml",
            {"model": {"mse": 0.001, "psnr": 33.0, "ssim": 0.95, "loss": 0.1}, "bicubic": ref},
        ),
        run_of(
            "ft",
            "recipes/finetune.yaml",
            {"model": {"mse": 0.002, "psnr": 31.0, "ssim": 0.94, "loss": 0.2}, "bicubic": ref},
        ),
    ]
    mae, sr = tables(runs)
    assert (mae["task"], mae["columns"]) == ("mae", ["loss"])
    assert [r["mode"] for r in mae["rows"]] == ["MAE pretrain"]  # no reference for the MAE
    assert mae["best"] == {"loss": 0.4}
    assert [r["mode"] for r in sr["rows"]] == ["EDSR", "full finetune", "bicubic"]
    assert sr["rows"][-1]["psnr"] == 30.0 and sr["rows"][-1]["run"] is None
    assert sr["rows"][0]["trainable"] == 6_643_713  # the recipe's model, counted
    text = markdown_all({"tables": [mae, sr]})
    assert "### masked-autoencoder pretraining (`mae`)" in text
    assert "### super-resolution (`sr`)" in text and "| **33.00** |" in text


def test_a_run_without_a_label_is_named_by_architecture_and_freeze() -> None:
    r = run_of("x", "recipes/finetune_frozen_encoder.yaml", {"model": {}}, ("label=null",))
    assert r.mode == "SR-MAE, frozen encoder"
    assert run_of("y", "recipes/baselines/rcan.yaml", {"model": {}}, ("label=null",)).mode == "RCAN"


# MAE pretraining runs' final losses, per learning rate and seed. Spread apart so that the sample
# std (n - 1) and the population std (n) differ by sqrt(3/2) - 1, 22%, at n = 3.
LOSSES = {
    ("1e-3", "0"): 0.40,
    ("1e-3", "1"): 0.10,
    ("1e-3", "2"): 0.25,
    ("1e-2", "0"): 0.90,
    ("1e-2", "1"): 0.30,
    ("1e-2", "2"): 0.45,
}


def sweep_dir(base: Path, losses: dict[tuple[str, str], float]) -> Path:
    """A sweep over optim.lr x train.seed as `launch --sweep` leaves it: sweep.json, and per
    variant a run directory with the resolved recipe.yaml, eval.json and metrics.jsonl."""
    variants = []
    for index, ((lr, seed), loss) in enumerate(losses.items()):
        overrides = [f"optim.lr={lr}", f"train.seed={seed}"]
        name = ",".join(overrides)
        variants.append({"index": index, "name": name, "overrides": overrides})
        run = base / name
        run.mkdir(parents=True)
        r = recipe.load(DEBUG_RECIPE, [*overrides, f"run.dir={run}"])
        (run / "recipe.yaml").write_text(recipe.dump(r))
        ev = {"split": "val", "count": 6, "model": {"loss": loss}, "bicubic": None}
        (run / "eval.json").write_text(json.dumps(ev))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 6, "epoch": 1.0}) + "\n")
    axes = {"optim.lr": ["1e-3", "1e-2"], "train.seed": ["0", "1", "2"]}
    doc = {"recipe": str(DEBUG_RECIPE), "axes": axes, "variants": variants, "array": None}
    (base / "sweep.json").write_text(json.dumps(doc))
    return base


def test_a_sweeps_seeds_fold_into_one_row_with_mean_sample_std_and_n(tmp_path: Path) -> None:
    """Runs of a sweep that differ only in train.seed are one row (mean, sample standard
    deviation with n - 1, and n); runs that differ in another swept key (optim.lr) stay apart."""
    runs = read_runs(sweep_dir(tmp_path / "sweep", LOSSES))
    assert len(runs) == 6
    (table,) = tables(runs)
    rows = {row["run"]: row for row in table["rows"]}
    assert set(rows) == {"optim.lr=1e-3", "optim.lr=1e-2"}  # no reference row for the MAE
    for lr in ("1e-3", "1e-2"):
        values = [LOSSES[(lr, seed)] for seed in ("0", "1", "2")]
        row = rows[f"optim.lr={lr}"]
        assert row["n"] == 3
        # The same three numbers summed in another order: float rounding only.
        assert row["loss"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert row["loss_std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert row["loss_std"] != pytest.approx(statistics.pstdev(values), rel=0.1)
    assert table["best"] == {"loss": pytest.approx(0.25, rel=1e-12)}  # the lower mean loss
    lines = markdown(table).splitlines()
    mean, std = statistics.mean([0.40, 0.10, 0.25]), statistics.stdev([0.40, 0.10, 0.25])
    assert f"(`optim.lr=1e-3`, 3 seeds) | **{mean:.6f}** ± {std:.6f} |" in lines[2]


def test_two_sweeps_with_the_same_swept_values_are_two_rows_each(tmp_path: Path) -> None:
    """The grouping is per sweep directory: the same override in two sweeps (another recipe,
    another day) is not averaged across them."""
    one = sweep_dir(tmp_path / "one", LOSSES)
    two = sweep_dir(tmp_path / "two", {k: v + 1 for k, v in LOSSES.items()})
    (table,) = tables([*read_runs(one), *read_runs(two)])
    assert [(row["run"], row["n"]) for row in table["rows"]] == [
        ("optim.lr=1e-3", 3),
        ("optim.lr=1e-2", 3),
    ] * 2
    # means of three numbers: float rounding only
    assert [row["loss"] for row in table["rows"]] == pytest.approx(
        [0.25, 0.55, 1.25, 1.55], rel=1e-12
    )
