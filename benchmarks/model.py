"""Benchmark: one training step of the workload MAE (masked vs not) and SR-MAE per finetune mode.

    python -m benchmarks.model [--batch 16] [--repeats 5] [--warmup 2] [--device cpu]
                               [--threads N]
                               [--out benchmarks/results/model.json]   # from the repo root

A step is forward, backward and AdamW on one fixed batch. The MAE at mask ratio 0.75 against
0.0 on the same batch gives the speed-up from the encoder seeing a quarter of the patches
(goal: >= 2.5x on CPU). Settings run in interleaved rounds (one step of each per round);
reports medians over `--repeats` rounds after `--warmup` rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import report
from toolkit.models import MODELS, apply_freeze, build_model, param_counts
from toolkit.runs import recipe

ROOT = Path(__file__).resolve().parents[1]
SR_SCALE = 2


def time_rounds(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per step for each setting, timed in interleaved rounds.

    One step of every setting per round, so a burst of load from other processes on a shared
    machine hits all settings alike and paired ratios stay meaningful.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for step in steps.values():
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def make_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    # The workload's models, as its recipes describe them.
    cfg = recipe.load(ROOT / "recipes/pretrain.yaml").model
    sr_cfg = recipe.load(ROOT / "recipes/finetune.yaml").model
    torch.manual_seed(0)
    hr = torch.rand(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    lr = F.interpolate(hr, scale_factor=1 / SR_SCALE, mode="bicubic", antialias=True)

    # (model, setting) -> (trainable params, step). One model per setting, each with its own
    # optimiser, so settings can be interleaved.
    settings: dict[tuple[str, str], tuple[int, Callable[[], None]]] = {}
    for ratio in (0.75, 0.0):
        mae = build_model(cfg).to(device)
        step = make_step(mae, lambda m=mae, r=ratio: m(hr, mask_ratio=r).loss)
        settings["mae", f"mask {ratio}"] = (param_counts(mae)[1], step)
    for label, freeze in (("frozen mae", ["mae"]), ("frozen encoder", ["encoder"]), ("full", [])):
        sr = build_model(sr_cfg, scale=SR_SCALE).to(device)
        apply_freeze(sr, freeze, MODELS.get("srmae").freeze_modes)
        step = make_step(sr, lambda m=sr: F.l1_loss(m(lr), hr))
        settings["srmae", label] = (param_counts(sr)[1], step)

    times = time_rounds({k: v[1] for k, v in settings.items()}, args.warmup, args.repeats, device)
    results = [
        {
            "model": model,
            "setting": setting,
            "trainable_params": trainable,
            "median_s": statistics.median(times[model, setting]),
            "min_s": min(times[model, setting]),
            "samples_per_s": args.batch / statistics.median(times[model, setting]),
            "times_s": times[model, setting],
        }
        for (model, setting), (trainable, _) in settings.items()
    ]
    masked, unmasked = times["mae", "mask 0.75"], times["mae", "mask 0.0"]
    return {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "image": [cfg.in_chans, cfg.img_size, cfg.img_size],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": results,
        "times_s": {f"{m} / {st}": times[m, st] for m, st in times},
        # Median of the per-round ratios: both settings of a round ran back to back.
        "mask_speedup": statistics.median(u / m for u, m in zip(unmasked, masked, strict=True)),
        "mask_speedup_of_medians": statistics.median(unmasked) / statistics.median(masked),
        "mask_speedup_goal": 2.5,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    # On a shared CPU, OpenMP threads that wait on each other at every op are slowed far more
    # by other processes than one thread is; --threads 1 gives steadier numbers there.
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model.json"))
    parser.add_argument("--tiny", action="store_true", help="batch 2, 2 rounds: it works")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.repeats, args.warmup = 2, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    rows = [{k: v for k, v in r.items() if k != "times_s"} for r in result.pop("results")]
    report(
        f"model benchmark: {result['device']}, torch {result['torch']}, {result['threads']} "
        f"threads, batch {result['batch']} x {result['image']}, median of {result['repeats']}; "
        f"masking speed-up (mask 0.0 / mask 0.75, median per-round ratio) "
        f"{result['mask_speedup']:.2f}x, goal >= {result['mask_speedup_goal']}x",
        rows,
        args.out,
        **result,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
