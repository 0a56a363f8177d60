"""ZeRO benchmark: optimiser-state and parameter bytes per rank, and step time, for ZeRO 0-3 vs DDP.

    python -m benchmarks.zero [--recipe recipes/finetune.yaml] [--batch 4] [--steps 5]
                              [--warmup 2] [--precision no|bf16] [--procs 2]
                              [--settings ddp,zero0,zero1,zero2,zero3]

The driver starts `torch.distributed.run --standalone --nproc-per-node P` once per setting,
each process running this module with `--worker`: the toolkit's own Engine (the recipe's train
and deepspeed sections), model (`build_model`, everything trainable), AdamW param groups
(`build_groups`/`build_optimizer`), scheduler and training step (`loop.train_step`) on random
batches held in memory. After the warm-up and the timed steps each rank counts, on itself:

- Adam state: every tensor in the state of the innermost torch optimiser (exp_avg, exp_avg_sq,
  step). Under ZeRO >= 1 that optimiser holds only this rank's flat partition.
- fp32 masters: the flat fp32 copies the DeepSpeed optimiser keeps beside the model's parameters
  (ZeRO-1/2 `single_partition_of_fp32_groups`, ZeRO-3 `fp32_partitioned_groups_flat`, bf16
  stage 0 `fp32_groups_flat_partition`); storage shared with a parameter is not counted twice.
  DDP and fp32 ZeRO-0 update the parameters themselves: none.
- parameters: `p.ds_tensor` (this rank's partition) under ZeRO-3, else the whole parameter.

Gradients are not counted. Step time: median over the timed steps of each rank, the slower
rank's. Results: one table on stdout and benchmarks/results/zero.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import TINY_VIT, report

SETTINGS = ("ddp", "zero0", "zero1", "zero2", "zero3")
MB = 1e6

logger = logging.getLogger("benchmarks.zero")


def overrides_for(setting: str, precision: str, batch: int, tiny: bool = False) -> list[str]:
    """Recipe overrides for one setting: a fresh, fully trainable model and the asked ZeRO stage
    (`tiny`: the model shrunk to `TINY_VIT`)."""
    common = ["init.from=null", "freeze=[]", f"train.precision={precision}",
              f"data.batch_size={batch}", *(TINY_VIT if tiny else [])]  # fmt: skip
    if setting == "ddp":
        return [*common, "deepspeed=null"]
    return [*common, f"deepspeed.zero_stage={int(setting.removeprefix('zero'))}",
            "deepspeed.offload_optimizer=none", "deepspeed.offload_param=none"]  # fmt: skip


# --- one process of one setting ------------------------------------------------------------------


def _tensors(obj: Any) -> Iterator[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _bytes(t: Any) -> int:
    return t.numel() * t.element_size()


def innermost_optimizer(optimizer: Any) -> Any:
    """accelerate's wrapper -> DeepSpeed's ZeRO/bf16 optimiser (if any) -> the torch AdamW."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None and len(chain) < 5:
        chain.append(chain[-1].optimizer)
    return chain


MASTER_ATTRS = (
    "single_partition_of_fp32_groups",  # ZeRO-1/2
    "fp32_partitioned_groups_flat",  # ZeRO-3
    "fp32_groups_flat_partition",  # bf16 without ZeRO (BF16_Optimizer)
)


def count_bytes(model: Any, optimizer: Any) -> dict[str, Any]:
    """What this rank holds: Adam state, fp32 master copies, parameters (see the module doc)."""
    chain = innermost_optimizer(optimizer)
    torch_opt = chain[-1]
    state = sum(_bytes(t) for s in torch_opt.state.values() for t in _tensors(s))
    param_ptrs: set[int] = set()
    params = 0
    numel_full = 0
    for p in model.parameters():
        numel_full += getattr(p, "ds_numel", p.numel())
        held = getattr(p, "ds_tensor", None)
        t = held if held is not None else p
        params += _bytes(t)
        param_ptrs.add(t.untyped_storage().data_ptr())
    masters = 0
    seen: set[int] = set()
    for wrapper in chain:
        for attr in MASTER_ATTRS:
            for t in _tensors(getattr(wrapper, attr, None) or []):
                ptr = t.untyped_storage().data_ptr()
                if ptr in param_ptrs or ptr in seen:
                    continue
                seen.add(ptr)
                masters += _bytes(t)
    return {
        "optimizer_chain": [type(o).__name__ for o in chain],
        "adam_state_bytes": state,
        "master_bytes": masters,
        "param_bytes": params,
        "param_numel_full": numel_full,
        "param_dtype": str(next(model.parameters()).dtype),
    }


def worker(args: argparse.Namespace) -> int:
    import torch

    from toolkit.engine.accel import Engine
    from toolkit.engine.checkpointer import Parts
    from toolkit.engine.model import build_model
    from toolkit.engine.optim import build_groups, build_optimizer, build_scheduler
    from toolkit.engine.state import TrainState
    from toolkit.engine.steps import StepPlan
    from toolkit.runs import recipe
    from toolkit.runs.loop import Run, train_step
    from toolkit.tasks import task_of

    r = recipe.load(args.recipe, overrides_for(args.setting, args.precision, args.batch, args.tiny))
    total = args.warmup + args.steps
    engine = Engine(r.train, r.deepspeed, micro_batch=r.data.batch_size)
    engine.seed(r.train.seed, per_rank=False)
    task = task_of(r)
    model = build_model(r, task)
    groups = build_groups(model, r.optim)
    optimizer = build_optimizer(groups, r.optim)
    scheduler = build_scheduler(
        optimizer, r.optim.scheduler, steps_per_epoch=max(total, 1), total_steps=total
    )
    # Counted before set-up: ZeRO-3 empties the parameters in place (numel 0, ds_numel full).
    expected = [(g.rule, g.lr, g.weight_decay, g.numel) for g in groups]
    trainable = sum(g.numel for g in groups)
    model, optimizer, scheduler = engine.prepare(model, optimizer, scheduler)
    engine.check_groups(optimizer, expected)
    # The loop's own step on batches held in memory: no loader, checkpointer or validation.
    run = Run(r, task, engine, Parts(model, optimizer, scheduler, None), None,
              StepPlan(total, r.train), None, None, {}, None)  # type: ignore[arg-type]  # fmt: skip

    g = torch.Generator().manual_seed(1000 + engine.rank)
    hr_side, c = r.model.img_size, r.model.in_chans
    hr = torch.rand(r.data.batch_size, c, hr_side, hr_side, generator=g)
    batch = {"hr": hr, "key": [f"{engine.rank}-{i}" for i in range(len(hr))]}
    if "lr" in task.fields:
        lr_side = hr_side // r.data.scale
        batch["lr"] = torch.nn.functional.interpolate(hr, size=(lr_side, lr_side), mode="area")

    def batches() -> Iterator[dict[str, Any]]:
        while True:
            yield batch

    it = batches()
    state = TrainState(world_size=engine.world_size)
    times: list[float] = []
    losses: list[float] = []
    for i in range(total):
        engine.barrier()
        start = time.perf_counter()
        loss_sum, count, _, _ = train_step(run, it, state)
        scheduler.step()
        state.step += 1
        elapsed = time.perf_counter() - start
        losses.append(float(loss_sum) / count)
        if i >= args.warmup:
            times.append(elapsed)
    counted = count_bytes(model, optimizer)
    result = {
        "setting": args.setting,
        "rank": engine.rank,
        "world_size": engine.world_size,
        "trainable": trainable,
        "step_times": times,
        "step_s": statistics.median(times),
        "losses": losses,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "threads": torch.get_num_threads(),
        **counted,
    }
    out = Path(args.out_dir) / f"{args.setting}-rank{engine.rank}.json"
    out.write_text(json.dumps(result) + "\n")
    engine.close(model, optimizer, scheduler)
    return 0


# --- the driver ----------------------------------------------------------------------------------


def run_setting(args: argparse.Namespace, setting: str, out_dir: Path) -> list[dict[str, Any]]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.procs}", "-m", "benchmarks.zero", "--worker",
        f"--setting={setting}", f"--out-dir={out_dir}", f"--recipe={args.recipe}",
        f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}",
        *(["--tiny"] if args.tiny else []),
        f"--precision={args.precision}",
    ]  # fmt: skip
    logger.info("%s: %s", setting, " ".join(cmd))
    log = out_dir / f"{setting}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    logger.info("%s: exit %d in %.1f s", setting, rc, time.perf_counter() - start)
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{setting}-rank*.json"))]
    if rc != 0 or len(results) != args.procs:
        lines = log.read_text(errors="replace").splitlines()
        traceback = [x for x in lines if x.startswith("[rank") and "^^^" not in x]
        tail = "\n".join((traceback or lines)[-12:])
        logger.error("%s failed (exit %d); last lines of its log:\n%s", setting, rc, tail)
        return []
    return results


def row_of(setting: str, ranks: list[dict[str, Any]], ddp: list[dict[str, Any]]) -> dict[str, Any]:
    if not ranks:
        return {"setting": setting, "error": "failed (see the log above)"}
    r0 = ranks[0]
    step = max(r["step_s"] for r in ranks)
    ddp_step = max(r["step_s"] for r in ddp) if ddp else None
    # The same model, data and seeds: every setting should follow DDP's losses (fp32: closely).
    loss_diff = (
        max(abs(a - b) for a, b in zip(r0["losses"], ddp[0]["losses"], strict=True))
        if ddp
        else float("nan")
    )
    # What every rank holds should be the same (up to padding); report the largest.
    state = max(r["adam_state_bytes"] for r in ranks)
    masters = max(r["master_bytes"] for r in ranks)
    params = max(r["param_bytes"] for r in ranks)
    fp32_params = r0["param_numel_full"] * 4
    return {
        "setting": setting,
        "adam_state_MB_per_rank": state / MB,
        "state_vs_2x_fp32_params": state / (2 * fp32_params),
        "fp32_master_MB_per_rank": masters / MB,
        "param_MB_per_rank": params / MB,
        "param_dtype": r0["param_dtype"].removeprefix("torch."),
        "step_s_median": step,
        "step_vs_ddp": step / ddp_step if ddp_step else float("nan"),
        "loss_max_diff_vs_ddp": loss_diff,
        "max_rss_MB": max(r["max_rss_mb"] for r in ranks),
        "optimizer": " > ".join(r0["optimizer_chain"][1:]) or r0["optimizer_chain"][0],
    }


def driver(args: argparse.Namespace) -> int:
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        logger.error("unknown setting(s) %s; expected some of %s", bad, ",".join(SETTINGS))
        return 2
    per_setting: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as tmp:
        for setting in settings:
            per_setting[setting] = run_setting(args, setting, Path(tmp))
    rows = [row_of(s, per_setting[s], per_setting.get("ddp") or []) for s in settings]
    first = next((v[0] for v in per_setting.values() if v), None)
    title = (
        f"ZeRO benchmark: {args.recipe}, {args.procs} processes, batch {args.batch}/process, "
        f"precision {args.precision}, median of {args.steps} steps after {args.warmup}; "
        "goal: ZeRO-1/2 halve the Adam state per rank, ZeRO-3 also the parameters"
    )
    report(
        title,
        rows,
        args.out,
        recipe=args.recipe,
        procs=args.procs,
        batch_per_process=args.batch,
        precision=args.precision,
        steps=args.steps,
        warmup=args.warmup,
        trainable_params=first["trainable"] if first else None,
        threads_per_process=first["threads"] if first else None,
        cpus=os.cpu_count(),
        counted=(
            "adam_state: tensors in the innermost torch optimiser's state (exp_avg, exp_avg_sq, "
            "step); fp32_master: DeepSpeed's flat fp32 partitions not sharing storage with a "
            "parameter; param: ds_tensor partition under ZeRO-3, else the whole parameter; "
            "gradients not counted; step: slower rank's median; max_rss: the process's peak "
            "resident memory (everything: libraries, activations, buffers)"
        ),
        per_rank={s: v for s, v in per_setting.items()},
    )
    return 0 if all(per_setting.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/finetune.yaml")
    p.add_argument("--batch", type=int, default=4, help="batch per process")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precision", choices=("no", "bf16"), default="no")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--timeout", type=float, default=600, help="seconds per setting")
    p.add_argument("--out", default="benchmarks/results/zero.json")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny ViT, DDP and ZeRO-2, 1 step after 1: it works")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.worker:
        return worker(args)
    if args.tiny:
        args.settings, args.steps, args.warmup, args.batch = "ddp,zero2", 1, 1, 2
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
