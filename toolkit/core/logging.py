"""Rank-0 run logging: TensorBoard (scalars, images, a sweep variant's hparams), metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


class RunLogger:
    """Writes what the training loop measures to ``run_dir/tb`` (TensorBoard), ``run_dir/
    metrics.jsonl`` (one JSON object per ``log`` call) and the console.

    Only rank 0 should pass ``enabled=True``; elsewhere every method is a no-op and nothing is
    created. ``start_step`` is the step the run resumes from (the checkpoint's: steps up to it are
    done); whatever a previous attempt logged after it is dropped from both the JSONL file and
    TensorBoard, so a step replayed after an exact resume (or a restart from 0 before the first
    checkpoint) is recorded once, with the values of the attempt that went on.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 10,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self._last_line_step = start_step
        self._writer: Any = None
        self._jsonl: IO[str] | None = None
        self._bar: Any = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        jsonl = run_dir / "metrics.jsonl"
        _truncate_jsonl(jsonl, start_step)
        self._jsonl = jsonl.open("a", encoding="utf-8")

        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes TensorBoard hide events an earlier attempt wrote at or after it; passed
        # on a fresh start too, so a run restarted before its first checkpoint shows one curve.
        self._writer = SummaryWriter(
            log_dir=str(run_dir / "tb"),
            purge_step=start_step + 1,
            flush_secs=30,
        )
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines then
                pass
            else:
                self._bar = tqdm(
                    total=total_steps, initial=start_step, unit="step", dynamic_ncols=True
                )

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Each scalar under its TensorBoard tag ("train/loss", "train/lr/<group>", "val/psnr",
        ...), one line in metrics.jsonl, and the progress display."""
        if not self.enabled:
            return
        values = {tag: float(v) for tag, v in scalars.items()}
        for tag, v in values.items():
            self._writer.add_scalar(tag, v, step)
        # Non-finite values become null so that every line is strict JSON (jq, pandas).
        record = {"step": step, "time": time.time()}
        record.update({tag: v if math.isfinite(v) else None for tag, v in values.items()})
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()  # a killed job keeps every line it logged
        self._progress(values, step)

    def images(self, tag: str, grid: Tensor, step: int) -> None:
        """One ``[C, H, W]`` image in [0, 1] (e.g. from ``image_grid``)."""
        if not self.enabled:
            return
        img = grid.detach().float().clamp(0, 1).cpu()
        self._writer.add_image(tag, img, step, dataformats="CHW")
        self._writer.flush()

    def hparams(self, values: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """A sweep variant's swept values and its final metrics for TensorBoard's HParams
        dashboard: the session summaries go into this run's own `tb/` event file (not the
        subfolder `SummaryWriter.add_hparams` would make) so `tensorboard --logdir SWEEP_DIR`
        shows one row per run, and each metric as a scalar `eval/<name>` at `step`, which is
        where the dashboard reads a metric's value from."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        numbers = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        tags = {f"eval/{k}": float(v) for k, v in numbers.items() if math.isfinite(v)}
        # The plugin takes numbers, strings and booleans: anything else (a list, null) as text.
        plain = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                 for k, v in values.items()}  # fmt: skip
        writer = self._writer.file_writer
        for summary in hparams(plain, tags):
            writer.add_summary(summary)
        for tag, v in tags.items():
            self._writer.add_scalar(tag, v, step)
        self._writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.enabled = False

    def _progress(self, values: dict[str, float], step: int) -> None:
        train = {k: v for k, v in values.items() if k.startswith("train/")}
        val = {k.removeprefix("val/"): v for k, v in values.items() if k.startswith("val/")}
        if "train/loss" in train:
            lr = next((v for k, v in train.items() if k.startswith("train/lr")), None)
            if self._bar is not None:
                self._bar.update(max(0, step - self._bar.n))
                post = {"loss": f"{train['train/loss']:.4g}"}
                if lr is not None:
                    post["lr"] = f"{lr:.1e}"
                self._bar.set_postfix(post, refresh=False)
            elif step - self._last_line_step >= self.log_every or step >= self.total_steps:
                self._last_line_step = step
                line = f"step {step}/{self.total_steps} loss {train['train/loss']:.4g}"
                if lr is not None:
                    line += f" lr {lr:.1e}"
                if "train/images_per_s" in train:
                    line += f" {train['train/images_per_s']:.1f} img/s"
                logger.info(line)
        if val:
            line = f"step {step}/{self.total_steps} val " + " ".join(
                f"{k} {v:.4g}" for k, v in val.items()
            )
            if self._bar is not None:
                self._bar.write(line, file=sys.stderr)
            else:
                logger.info(line)


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Keep only the lines of an earlier attempt with step <= start_step (and drop a line torn by
    a kill), rewriting the file atomically; leave it untouched when nothing needs dropping."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if line.endswith("\n") and step <= start_step:
            keep.append(line)
    if len(keep) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    logger.info(
        "metrics.jsonl: dropped %d line(s) after step %d", len(lines) - len(keep), start_step
    )


def image_grid(rows: list[list[Tensor]], pad: int = 2) -> Tensor:
    """Tiles ``[C, h, w]`` laid out as rows (e.g. one per sample: LR | bicubic | SR | HR) ->
    one ``[C, H, W]`` float image in [0, 1] on the CPU, with ``pad`` white pixels between and
    around the tiles. Smaller tiles are scaled up with nearest to the largest tile's size (so LR
    shows its pixels); 1-channel tiles are repeated to match 3-channel ones."""
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("image_grid needs a non-empty list of rows of equal length")
    tiles = [[t.detach().float().cpu() for t in row] for row in rows]
    flat = [t for row in tiles for t in row]
    if any(t.ndim != 3 for t in flat):
        raise ValueError("image_grid tiles must be [C, h, w]")
    c = max(t.shape[0] for t in flat)
    h = max(t.shape[1] for t in flat)
    w = max(t.shape[2] for t in flat)
    n_rows, n_cols = len(tiles), len(tiles[0])
    ranges = [display_range(row) for row in tiles]
    grid = torch.ones(c, pad + n_rows * (h + pad), pad + n_cols * (w + pad))
    for i, row in enumerate(tiles):
        lo, hi = ranges[i]
        for j, t in enumerate(row):
            if t.shape[1:] != (h, w):
                t = F.interpolate(t[None], size=(h, w), mode="nearest")[0]
            if t.shape[0] != c:
                t = t.expand(c, -1, -1)
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top : top + h, left : left + w] = ((t - lo) / (hi - lo)).clamp(0, 1)
    return grid


def display_range(row: list[Tensor]) -> tuple[float, float]:
    """The values a sample row is shown between, the same for each of its tiles so that they
    compare: [0, 1] where its target (the last tile) lies there (photographs, `unit` data),
    else the target's 0.5th and 99.5th percentiles (data in its own units: negative after sky
    subtraction, far above 1), where clamping to [0, 1] would show a black or white square."""
    target = row[-1].detach().float().flatten()
    if target.min() >= 0 and target.max() <= 1:
        return 0.0, 1.0
    lo, hi = torch.quantile(target, torch.tensor([0.005, 0.995])).tolist()
    return lo, max(hi, lo + 1e-12)
