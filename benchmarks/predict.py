"""Benchmark: what tiling costs in accuracy (the seam error) and how fast prediction runs.

    python -m benchmarks.predict [--runs runs/demo] [--data data/demo/raw] [--repeats 3]
                                 [--out benchmarks/results/predict.json]   # after `make demo`

Seams: a mosaic of the demo's LR images is super-resolved twice: with tiles on a regular grid,
and with the grid shifted by half a step (half a step / K with K averaged tilings: the image
padded by that on every side by reflection, the padding cut off again). For the trained SR-MAE
(fixed 75x75 LR tiles) and EDSR (tiled like it), with one tiling and with two averaged. The
seam error is the RMS difference of the two predictions away from the image border, against
the model's own error (RMS of prediction minus HR) there. Speed: tiles/s of SR-MAE in fp32 and
bf16 at batch 8, median of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import report, timed
from toolkit.models import MODELS
from toolkit.prediction.tiles import Canvas, Tiling, assemble
from toolkit.runs.directory import load_model, locate

ROOT = Path(__file__).resolve().parents[1]


def mosaic(raw: Path, side: int, lr_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An LR image `lr_side` square cut from a grid of the demo's LR images, and its HR."""
    n = -(-lr_side // side)
    lr_rows, hr_rows = [], []
    for r in range(n):
        keys = [f"{r * n + c:06d}.npy" for c in range(n)]
        lr_rows.append(np.concatenate([np.load(raw / "lr" / k) for k in keys], axis=1))
        hr_rows.append(np.concatenate([np.load(raw / "hr" / k) for k in keys], axis=1))
    lr, hr = np.concatenate(lr_rows), np.concatenate(hr_rows)
    return (torch.from_numpy(lr[:lr_side, :lr_side])[None],
            torch.from_numpy(hr[: 2 * lr_side, : 2 * lr_side])[None])  # fmt: skip


def predict(model: torch.nn.Module, lr: torch.Tensor, tiling: Tiling, pad: int) -> torch.Tensor:
    x = F.pad(lr[None], (pad, pad, pad, pad), mode="reflect")[0] if pad else lr
    with torch.no_grad():
        canvas = next(assemble([Canvas(x, 2, tiling)], model, 8))
    out = canvas.result().clamp(0, 1)
    return out[:, 2 * pad : out.shape[1] - 2 * pad, 2 * pad : out.shape[2] - 2 * pad]


def seams(name: str, run: Path, raw: Path, tile: int) -> list[dict]:
    model = load_model(locate(run))
    fixed = MODELS.get(locate(run).recipe.model.arch).fixed_size  # type: ignore[union-attr]
    rows = []
    for overlap, shifts in [(tile // 4, 1), (tile // 4, 2), (tile // 2, 1), (1, 1)]:
        # The averaged tilings repeat every step / shifts: the second prediction is offset by
        # half of that, where its tile edges fall farthest from the first's.
        step = tile - overlap
        step -= step % (2 * shifts)  # the shifted grid is then regular too
        overlap = tile - step
        lr_side = tile + 3 * step
        lr, hr = mosaic(raw, 75, lr_side)
        tiling = Tiling(tile, overlap, fixed, shifts)
        a, b = predict(model, lr, tiling, 0), predict(model, lr, tiling, step // (2 * shifts))
        inner = (slice(None), slice(2 * tile, -2 * tile), slice(2 * tile, -2 * tile))
        seam = (a - b)[inner].pow(2).mean().sqrt().item()
        error = (a - hr)[inner].pow(2).mean().sqrt().item()
        rows.append({"model": name, "tile": tile, "overlap": overlap, "shifts": shifts,
                     "lr side": lr_side, "seam rms": seam, "model rms": error,
                     "seam / model": seam / error,
                     "seam max": (a - b)[inner].abs().max().item()})  # fmt: skip
    return rows


def speed(run: Path, repeats: int) -> list[dict]:
    model = load_model(locate(run))
    tiles = torch.rand(8, 1, 75, 75)
    rows = []
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else None

        def step(dtype: torch.dtype | None = dtype) -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                model(tiles)

        seconds, _ = timed(step, repeats, warmup=1)
        rows.append({"model": "SR-MAE", "precision": precision, "tiles/s": 8 / seconds})
    return rows


def tiny_runs(root: Path) -> tuple[Path, Path]:
    """The demo's SR-MAE and EDSR trained 2 steps on 16 random pairs: the runs and their images
    (what `--tiny` measures the seams of, to show that the benchmark works)."""
    from toolkit.data.sharding import shard
    from toolkit.runs import recipe
    from toolkit.runs.loop import train

    raw, rng = root / "raw", np.random.default_rng(0)
    for side in ("hr", "lr"):
        (raw / side).mkdir(parents=True)
    for i in range(16):
        hr = rng.random((150, 150), dtype=np.float32)
        np.save(raw / "hr" / f"{i:06d}.npy", hr)
        np.save(raw / "lr" / f"{i:06d}.npy", hr.reshape(75, 2, 75, 2).mean((1, 3)))
    shard(raw, root / "shards", val_fraction=0.25)
    for name, recipe_file in (("finetune", "finetune.yaml"), ("edsr", "edsr.yaml")):
        overrides = [f"data.shards={root / 'shards'}", f"run.dir={root / 'runs' / name}",
                     "init.from=null", "train.max_steps=2", "data.batch_size=4",
                     "data.num_workers=0"]  # fmt: skip
        train(recipe.load(ROOT / "recipes" / "demo" / recipe_file, overrides))
    return root / "runs", raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/demo", help="the demo's run directories")
    p.add_argument("--data", default="data/demo/raw", help="the demo's paired images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict.json"))
    p.add_argument("--tiny", action="store_true",
                   help="models trained 2 steps on random pairs, 1 repeat: it works")  # fmt: skip
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.repeats = 1
            args.runs, args.data = tiny_runs(Path(tmp))
        measure(Path(args.runs), Path(args.data), args.repeats, args.out)
    return 0


def measure(runs: Path, raw: Path, repeats: int, out: str) -> None:
    rows = seams("SR-MAE", runs / "finetune", raw, 75) + seams("EDSR", runs / "edsr", raw, 75)
    rows += speed(runs / "finetune", repeats)
    report("predict: seam error of two tilings half a step apart; SR-MAE tiles/s", rows,
           out, threads=torch.get_num_threads())  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
