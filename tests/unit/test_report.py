"""The results table: best values per column, formatting, missing metrics."""

from __future__ import annotations

from toolkit.report import best, markdown


def row(run: str | None, mode: str, mse: float | None, psnr: float | None, ssim: float | None):
    return {"run": run, "mode": mode, "mse": mse, "psnr": psnr, "ssim": ssim,
            "trainable": 10 if run else None, "epochs": 2.5 if run else None,
            "init_from": "runs/pre" if run else None, "split": "val", "count": 7}  # fmt: skip


ROWS = [
    row("pre", "MAE pretrain", None, None, None),
    row("a", "frozen MAE", 0.002, 31.0, 0.95),
    row("b", "full finetune", 0.001, 33.0, 0.94),
    row(None, "bicubic", 0.003, 30.0, 0.96),
]


def test_best_is_lowest_mse_and_highest_psnr_ssim_ignoring_missing_values() -> None:
    assert best(ROWS) == {"mse": 0.001, "psnr": 33.0, "ssim": 0.96}


def test_markdown_bolds_each_best_once_and_formats_the_rest() -> None:
    lines = markdown(ROWS).splitlines()
    assert lines[2] == "| MAE pretrain (`pre`) | - | - | - | 10 | 2.5 | `pre` |"
    assert (
        lines[4] == "| full finetune (`b`) | **0.001000** | **33.00** | 0.9400 | 10 | 2.5 | `pre` |"
    )
    assert lines[5] == "| bicubic | 0.003000 | 30.00 | **0.9600** | - | - | - |"
    assert lines[-1] == "val split, 7 images; bicubic upscaling of the same inputs."
