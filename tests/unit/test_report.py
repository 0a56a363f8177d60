"""The results tables: best values by each metric's direction, formatting, missing metrics, one
table per task with its reference row."""

from __future__ import annotations

from pathlib import Path

from toolkit import recipe
from toolkit.report import Run, best, markdown, markdown_all, tables

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
