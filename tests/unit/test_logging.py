"""RunLogger: TensorBoard scalars and images read back, metrics.jsonl, rank != 0, resume, progress;
and image_grid."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from toolkit.core.logging import RunLogger, image_grid


@pytest.fixture(autouse=True)
def not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    # Plain-line progress whatever the terminal running pytest -s is; one test opts back in.
    monkeypatch.setattr(sys, "stderr", io.StringIO())


def train_scalars(step: int) -> dict[str, float]:
    return {
        "train/loss": 1.0 / step,
        "train/lr/encoder": 8e-5,
        "train/lr/default": 5e-4,
        "train/grad_norm": 0.5,
        "train/images_per_s": 123.4,
        "train/data_wait": 0.05,
    }


def read_tb(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalar_steps(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_scalars_and_image_reach_tensorboard_and_jsonl(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, enabled=True, total_steps=20)
    for step in range(1, 21):
        log.log(train_scalars(step), step)
    val = {"val/mse": 0.000921, "val/psnr": 30.36, "val/ssim": 0.9524, "val/psnr_bicubic": 27.5}
    log.log(val, 20)
    grid = image_grid([[torch.rand(1, 8, 8), torch.rand(1, 16, 16)]])
    log.images("val/samples", grid, 20)
    log.close()

    tb = read_tb(tmp_path)
    tags = set(tb.Tags()["scalars"])
    assert set(train_scalars(1)) | set(val) <= tags
    loss = scalar_steps(tb, "train/loss")
    assert sorted(loss) == list(range(1, 21))
    assert loss[4] == pytest.approx(0.25)
    assert scalar_steps(tb, "val/psnr") == {20: pytest.approx(30.36)}
    assert scalar_steps(tb, "train/lr/encoder")[7] == pytest.approx(8e-5)
    (image,) = tb.Images("val/samples")
    assert image.step == 20
    assert (image.height, image.width) == tuple(grid.shape[1:])

    lines = read_jsonl(tmp_path)
    assert len(lines) == 21
    assert lines[0]["step"] == 1 and lines[0]["train/loss"] == pytest.approx(1.0)
    assert lines[0]["train/lr/default"] == pytest.approx(5e-4)
    assert isinstance(lines[0]["time"], float)
    assert lines[-1] == {"step": 20, "time": lines[-1]["time"], **val}


def test_non_finite_values_are_strict_json_nulls(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, enabled=True, total_steps=10)
    log.log({"train/loss": float("nan"), "train/grad_norm": float("inf")}, 1)
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["train/loss"] is None


def test_disabled_logger_creates_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = RunLogger(run_dir, enabled=False, total_steps=10)
    log.log(train_scalars(1), 1)
    log.images("val/samples", torch.rand(1, 4, 4), 1)
    log.close()
    assert not run_dir.exists()


def test_resume_drops_what_a_crashed_attempt_logged_after_start_step(tmp_path: Path) -> None:
    first = RunLogger(tmp_path, enabled=True, total_steps=30)
    for step in range(1, 16):
        first.log({"train/loss": 1.0}, step)
    first.close()
    # The crash tore the last line in half.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 16, "train/lo')

    # Checkpoint at step 10 (steps 1..10 done): steps 11..15 are replayed, with other values.
    second = RunLogger(tmp_path, enabled=True, total_steps=30, start_step=10)
    assert [line["step"] for line in read_jsonl(tmp_path)] == list(range(1, 11))
    for step in range(11, 21):
        second.log({"train/loss": 2.0}, step)
    second.close()

    lines = read_jsonl(tmp_path)
    assert [line["step"] for line in lines] == list(range(1, 21))  # each step once
    assert {line["train/loss"] for line in lines if line["step"] > 10} == {2.0}
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    events = read_tb(tmp_path).Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, 21))  # purge_step hid the stale 11..15
    loss = {e.step: e.value for e in events}
    assert all(loss[s] == 2.0 for s in range(11, 21))
    assert all(loss[s] == 1.0 for s in range(1, 11))


def test_restart_before_the_first_checkpoint_starts_both_logs_afresh(tmp_path: Path) -> None:
    first = RunLogger(tmp_path, enabled=True, total_steps=30)
    for step in range(1, 8):
        first.log({"train/loss": 1.0}, step)
    first.close()
    second = RunLogger(tmp_path, enabled=True, total_steps=30, start_step=0)
    for step in range(1, 4):
        second.log({"train/loss": 2.0}, step)
    second.close()
    assert [(line["step"], line["train/loss"]) for line in read_jsonl(tmp_path)] == [
        (1, 2.0),
        (2, 2.0),
        (3, 2.0),
    ]
    events = read_tb(tmp_path).Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(1, 2.0), (2, 2.0), (3, 2.0)]


def test_resume_with_nothing_stale_leaves_the_file_alone(tmp_path: Path) -> None:
    first = RunLogger(tmp_path, enabled=True, total_steps=30)
    for step in range(1, 6):
        first.log({"train/loss": 1.0}, step)
    first.close()
    before = (tmp_path / "metrics.jsonl").stat().st_ino
    RunLogger(tmp_path, enabled=True, total_steps=30, start_step=6).close()
    assert (tmp_path / "metrics.jsonl").stat().st_ino == before
    assert len(read_jsonl(tmp_path)) == 5


def test_plain_progress_lines_when_not_a_tty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolkit.core.logging")
    log = RunLogger(tmp_path, enabled=True, total_steps=1000, start_step=100, log_every=10)
    for step in range(101, 125):
        log.log(train_scalars(step) | {"train/loss": 0.0123}, step)
    log.log({"val/psnr": 30.36, "val/ssim": 0.9524}, 124)
    log.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "toolkit.core.logging"]
    assert lines == [
        "step 110/1000 loss 0.0123 lr 8.0e-05 123.4 img/s",
        "step 120/1000 loss 0.0123 lr 8.0e-05 123.4 img/s",
        "step 124/1000 val psnr 30.36 ssim 0.9524",
    ]


def test_progress_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    log = RunLogger(tmp_path, enabled=True, total_steps=50, start_step=20)
    for step in range(21, 31):
        log.log({"train/loss": 0.5, "train/lr/default": 5e-4}, step)
    assert log._bar.n == 30
    log.log({"val/psnr": 30.0}, 30)
    log.close()
    out = tty.getvalue()
    assert "30/50" in out and "loss=0.5" in out and "val psnr 30" in out


def test_image_grid_shape_range_and_nearest_upsampling() -> None:
    lr = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # [1, 2, 2]
    hr = torch.rand(1, 4, 4)
    sr = hr * 1.5 - 0.2  # out of [0, 1] on purpose
    rows = [[lr, sr, hr], [lr, sr, hr]]
    grid = image_grid(rows, pad=1)
    assert grid.shape == (1, 1 + 2 * (4 + 1), 1 + 3 * (4 + 1))
    assert grid.min() >= 0 and grid.max() <= 1
    # LR keeps its pixels: each one becomes a 2x2 block
    expected = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert torch.equal(grid[0, 1:5, 1:5], expected)
    assert torch.equal(grid[0, 1:5, 6:10], sr[0].clamp(0, 1))  # a target in [0, 1]: as is
    # grey tiles next to colour ones are repeated across channels
    mixed = image_grid([[torch.rand(1, 6, 6), torch.rand(3, 6, 6)]], pad=0)
    assert mixed.shape == (3, 6, 12)
    assert torch.equal(mixed[0, :, :6], mixed[2, :, :6])
    with pytest.raises(ValueError, match="equal length"):
        image_grid([[lr, hr], [lr]])


def test_a_row_of_data_in_its_own_units_is_stretched_not_saturated() -> None:
    """Sky-subtracted counts (-20..400): clamped to [0, 1] they would show as a white square;
    each row is shown between its target's 0.5th and 99.5th percentiles, all tiles alike."""
    hr = torch.linspace(-20, 400, 64).reshape(1, 8, 8)
    grid = image_grid([[hr * 0.9, hr]], pad=0)
    lo, hi = torch.quantile(hr.flatten(), torch.tensor([0.005, 0.995])).tolist()
    torch.testing.assert_close(grid[:, :, 8:], ((hr - lo) / (hi - lo)).clamp(0, 1))
    torch.testing.assert_close(grid[:, :, :8], ((hr * 0.9 - lo) / (hi - lo)).clamp(0, 1))
    assert 0.3 < grid[:, :, 8:].mean() < 0.7
