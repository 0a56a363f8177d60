"""The GPU check's measurements, driven by benchmarks/gpu.sh (which installs what is missing):
training throughput for DDP and ZeRO-2, SR-MAE and the MAE, bf16, compiled and not; peak
memory; model FLOP utilisation; an exact-resume check; the GPU-binding check.

    python -m benchmarks.gpu OUT_DIR [--cpu-smoke] [--budget 450] [--steps 40] [--log-every 10]

Each configuration is one `toolkit.launch RECIPE --local` run on synthetic 150x150 / 75x75 pairs,
logging every `--log-every` steps as a real run does (a log line reads the loss back from the
device, so logging every step would time a step the loop does not take). Images/s and the
data-wait share are the medians of the loop's own log windows after the first (which holds the
warm-up and, compiled, the compilation); peak memory the largest `train/peak_memory_gb` it
logged. MFU: the FLOPs of one training step (forward and backward, counted by FlopCounterMode on
the meta device) x images/s over the device's bf16 dense peak.

Configurations run in order of importance; one whose time, estimated from those already run,
would not fit what is left of the budget is skipped and reported as "skipped (budget)". Exit
status: 0 every configuration ran and every check passed; 3 every check that ran passed, but
configurations were skipped for the budget; 1 a configuration or a check failed; 2 bad arguments.
Writes three files into OUT_DIR: gpu.json, gpu.md and gpu-logs.tar.gz.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import TINY_VIT, stamp

logger = logging.getLogger("benchmarks.gpu")

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 3
# bf16 dense peak in TFLOP/s by device name (first match wins).
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
         ("GH200", 989.4), ("A100", 312.0)]  # fmt: skip


@dataclass(frozen=True)
class Config:
    label: str
    recipe: str
    backend: tuple[str, ...]
    compiled: bool

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-")


SR, MAE = "recipes/finetune.yaml", "recipes/pretrain.yaml"
ZERO2, DDP = ("deepspeed.zero_stage=2",), ("deepspeed=null",)
# In order of importance: what the budget cuts is the end of this list.
CONFIGS = [
    Config("sr zero2", SR, ZERO2, False),
    Config("mae zero2", MAE, ZERO2, False),
    Config("sr ddp", SR, DDP, False),
    Config("mae ddp", MAE, DDP, False),
    Config("sr zero2 compiled", SR, ZERO2, True),
    Config("sr ddp compiled", SR, DDP, True),
    Config("mae zero2 compiled", MAE, ZERO2, True),
    Config("mae ddp compiled", MAE, DDP, True),
]
# The CPU smoke runs ZeRO-2 and DDP, SR-MAE and the MAE, and lists the others. Not compilation:
# inductor takes about 100 s on a 2-core CPU (tests/e2e/test_train.py checks train.compile).
SMOKE_CONFIGS = ("sr zero2", "mae ddp")
TINY = tuple(TINY_VIT)


@dataclass(frozen=True)
class Plan:
    """How big the check is: the GPU's, or the CPU smoke's."""

    images: int
    batch: int
    workers: int
    steps: int  # per configuration; a multiple of log_every
    log_every: int
    first_guess_s: float  # a configuration's seconds before any has run
    compile_extra_s: float  # what compiling adds, before a compiled configuration has run
    reserve_s: float  # kept back for what follows the configurations
    overrides: tuple[str, ...] = ()


def plan_for(smoke: bool, steps: int, log_every: int) -> Plan:
    steps = max(2, -(-steps // log_every)) * log_every  # whole windows, at least the warm-up + 1
    if smoke:
        return Plan(48, 4, 1, 4, 2, 30.0, 30.0, 0.0, TINY)
    return Plan(4000, 64, 8, steps, log_every, 90.0, 120.0, 20.0)


# --- FLOPs and MFU ---------------------------------------------------------------------------


def synthetic_batch(r: Any, n: int, device: Any) -> dict[str, Any]:
    """A batch of every field a task may read, at the recipe's sizes."""
    import torch

    side = r.model.img_size
    hr = torch.rand(n, r.model.in_chans, side, side, device=device)
    return {"key": [str(i) for i in range(n)], "hr": hr,
            "lr": hr[..., :: r.data.scale, :: r.data.scale].contiguous(),
            "label": torch.zeros(n, dtype=torch.long, device=device)}  # fmt: skip


def step_flops(model: Any, loss_of: Any) -> int:
    """FLOPs (matrix products and convolutions, 2 per multiply-add) of one training step:
    `loss_of(model)` and its backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_of(model).backward()
    return counter.get_total_flops()


def train_flops_per_image(recipe_path: str | Path, overrides: list[str], batch: int = 2) -> float:
    """FLOPs of one training step per image for the recipe's model and task, counted on the meta
    device: shapes only, so the full-size model costs nothing to count, and attention is counted
    by the formula of the fused kernel (FlopCounterMode misses the CPU's fused one)."""
    import torch

    from toolkit.engine.model import build_model
    from toolkit.runs import recipe
    from toolkit.tasks import Placement, task_of

    r = recipe.load(ROOT / recipe_path, overrides)
    meta = torch.device("meta")
    model = build_model(r).to(meta).train()
    task, data = task_of(r), synthetic_batch(r, batch, meta)
    rng = torch.Generator().manual_seed(0)
    flops = step_flops(model, lambda m: task.train_loss(m, data, Placement(meta), rng))
    return flops / batch


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: the FLOPs the model needs per second over the device's peak."""
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


# --- what a run logged -------------------------------------------------------------------------


def steady_windows(lines: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(steps, log line) of each steady window of training log lines: every line's window (the
    steps since the line before) but the first, which holds the warm-up, and none that saved or
    evaluated."""
    busy = {x["step"] for x in lines if any(k.startswith(("val/", "checkpoint/")) for k in x)}
    train = sorted((x for x in lines if "train/loss" in x), key=lambda x: x["step"])
    return [(b["step"] - a["step"], b) for a, b in itertools.pairwise(train)
            if not any(s in busy for s in range(a["step"], b["step"]))]  # fmt: skip


def measure(run_dir: Path) -> dict[str, Any]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    windows = steady_windows(lines)
    steady = [x for _, x in windows]
    ips = [x["train/images_per_s"] for x in steady if x.get("train/images_per_s")]
    wait = [x["train/data_wait"] for x in steady if x.get("train/data_wait") is not None]
    peak = [x["train/peak_memory_gb"] for x in lines if "train/peak_memory_gb" in x]
    median = statistics.median(ips) if ips else None
    return {"images_per_s": median,
            "images_per_s_windows": ips,
            # (max - min) / median over the windows: how far one window's number can be trusted
            "spread": (max(ips) - min(ips)) / median if median else None,
            "timed_steps": sum(n for n, _ in windows),
            "data_wait_share": statistics.median(wait) if wait else None,
            "peak_memory_gb": max(peak) if peak else None}  # fmt: skip


def logged_steps(run_dir: Path) -> list[int]:
    text = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [x["step"] for x in map(json.loads, filter(None, text)) if "train/loss" in x]


def expected_log_steps(total: int, every: int) -> list[int]:
    """The steps the loop logs in a run of `total` steps: every `every`-th, and the last."""
    return sorted({*range(every, total + 1, every), total})


# --- the budget --------------------------------------------------------------------------------


def estimate(config: Config, rows: list[dict[str, Any]], plan: Plan) -> float:
    """Seconds the configuration should take: as long as the slowest of its kind (compiled or
    not) that ran, or, compiled with none of its kind yet, the slowest that ran plus what
    compiling adds."""
    ran = [r for r in rows if r.get("seconds") is not None]
    same = [r["seconds"] for r in ran if r["compiled"] == config.compiled]
    if same:
        return max(same)
    if ran:
        return max(r["seconds"] for r in ran) + (plan.compile_extra_s if config.compiled else 0)
    return plan.first_guess_s + (plan.compile_extra_s if config.compiled else 0)


def fits(need: float, left: float) -> bool:
    """A quarter on top of the estimate: a run cut by its timeout measures nothing."""
    return 1.25 * need <= left


# --- running -----------------------------------------------------------------------------------


def run(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> int:
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=ROOT, env={**os.environ, **(env or {})})  # fmt: skip
            return proc.returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu.py] killed after {timeout:.0f} s\n")
            return 124


def make_data(src: Path, count: int, side: int) -> None:
    """Smooth random HR images (Gaussian blobs) and 2x2-mean LR: decode cost, not content."""
    (src / "hr").mkdir(parents=True)
    (src / "lr").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for i in range(count):
        cy, cx, sy, sx = rng.random(4, dtype=np.float32)
        img = np.exp(-((yy - cy) ** 2 / (0.02 + 0.1 * sy) + (xx - cx) ** 2 / (0.02 + 0.1 * sx)))
        hr = (0.03 + 0.94 * img / img.max()).astype(np.float32)
        np.save(src / "hr" / f"{i:06d}.npy", hr)
        np.save(src / "lr" / f"{i:06d}.npy", hr.reshape(side // 2, 2, side // 2, 2).mean((1, 3)))


def launch(config: Config, common: list[str], run_dir: Path, steps: int, log: Path,
           timeout: float) -> int:  # fmt: skip
    overrides = [*common, *config.backend, f"run.dir={run_dir}", f"train.max_steps={steps}",
                 f"train.compile={str(config.compiled).lower()}"]  # fmt: skip
    cmd = [sys.executable, "-m", "toolkit.launch", config.recipe, "--local", *overrides]
    return run(cmd, log, timeout)


def binding_check(work: Path) -> dict[str, Any]:
    """A process bound to one GPU with a local rank that would not exist: it takes device 0."""
    code = ("import os, torch; from toolkit.engine import devices; d = devices.bind(); "
            "print(d, os.environ['LOCAL_RANK'], torch.cuda.current_device() if d == 'cuda' "
            "else '-')")  # fmt: skip
    env = {"CUDA_VISIBLE_DEVICES": "0", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}
    rc = run([sys.executable, "-c", code], work / "binding.log", 120, env)
    text = (work / "binding.log").read_text().strip().splitlines()
    return {"exit": rc, "printed": text[-1] if text else "", "ok": rc == 0 and bool(text)
            and text[-1].split() == ["cuda", "0", "0"]}  # fmt: skip


def versions() -> dict[str, Any]:
    """What the numbers were measured with: the check runs on whatever torch the machine has."""
    import torch

    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "driver": driver_version() if cuda else None}  # fmt: skip
    for name in ("accelerate", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def driver_version() -> str | None:
    try:
        cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


# --- the report --------------------------------------------------------------------------------


def verdict(rows: list[dict[str, Any]], checks: dict[str, bool]) -> tuple[int, str]:
    """The exit status and the one line that says it."""
    failed = [r["config"] for r in rows if r["status"] != "ok"
              and not r["status"].startswith("skipped")]  # fmt: skip
    failed += [k for k, v in checks.items() if not v]
    skipped = [r["config"] for r in rows if r["status"] == "skipped (budget)"]
    ran = sum(r["status"] == "ok" for r in rows)
    if failed:
        return EXIT_FAILED, f"FAILED: {', '.join(failed)}"
    if skipped:
        return EXIT_PARTIAL, (f"partial: {ran} configurations ran and every check passed; "
                              f"{len(skipped)} skipped (budget): {', '.join(skipped)}")  # fmt: skip
    return EXIT_OK, f"{ran} configurations ran and every check passed"


def title(env: dict[str, Any], plan: Plan) -> str:
    """What the check ran on and how: the first line of gpu.md and the title in gpu.json."""
    return (f"GPU check: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN "
            f"{env['cudnn']}, driver {env['driver']}), Python {env['python']}; batch "
            f"{plan.batch}, {plan.steps} steps, a log line every {plan.log_every}, the first "
            "window (warm-up) not timed")  # fmt: skip


def markdown(doc: dict[str, Any]) -> str:
    cols = ["config", "status", "images_per_s", "spread", "data_wait_share", "peak_memory_gb",
            "train_gflops_per_image", "mfu", "seconds"]  # fmt: skip
    md = [doc["title"] + ".", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
    for r in doc["configs"]:
        cells = [f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                 for c in cols]  # fmt: skip
        md.append("| " + " | ".join(cells) + " |")
    md += ["", *(f"- {k}: {'ok' if v else 'FAILED'}" for k, v in doc["checks"].items())]
    md += ["", f"**{doc['summary']}** (exit {doc['exit']})"]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU: the script works")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything")
    p.add_argument("--steps", type=int, default=40, help="per configuration, warm-up included")
    p.add_argument("--log-every", type=int, default=10, help="steps per log line (timed window)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    # The shards are kept between calls (the smoke's apart: they are smaller); the runs are not,
    # or a finished one would be left as it is and measured again.
    work = Path(os.environ.get("GPU_WORK", "/tmp/srmae-gpu")) / ("smoke" if a.cpu_smoke else "gpu")
    shutil.rmtree(work / "runs", ignore_errors=True)
    for old in work.glob("*.log"):
        old.unlink()
    work.mkdir(parents=True, exist_ok=True)
    plan = plan_for(a.cpu_smoke, a.steps, a.log_every)
    env_info = versions()
    peak = next((v for k, v in PEAKS if k in env_info["device"]), None)
    shards = prepare_data(work, plan)
    common = [f"data.shards={shards}", f"data.batch_size={plan.batch}",
              f"data.num_workers={plan.workers}", "train.precision=bf16",
              "train.eval_every=1000000", f"train.log_every={plan.log_every}",
              f"train.checkpoint_every={plan.steps}", "init.from=null", "freeze=[]",
              "cluster.gpus_per_node=1", *plan.overrides]  # fmt: skip
    checks: dict[str, bool] = {}
    if not a.cpu_smoke:  # seconds, and the most basic check: run it first
        checks["one visible GPU, local rank 3: device 0"] = binding_check(work)["ok"]
    rows: list[dict[str, Any]] = []
    flops: dict[str, float] = {}
    for i, config in enumerate(CONFIGS):
        row: dict[str, Any] = {"config": config.label, "recipe": config.recipe,
                               "backend": list(config.backend),
                               "compiled": config.compiled}  # fmt: skip
        rows.append(row)
        if a.cpu_smoke and config.label not in SMOKE_CONFIGS:
            row["status"] = "skipped (not in the CPU smoke)"
            continue
        left = a.budget - (time.monotonic() - start) - plan.reserve_s
        need = estimate(config, rows, plan)
        if i and not fits(need, left):  # the first always runs: it is what estimates come from
            row.update(status="skipped (budget)", estimated_seconds=need)
            logger.info("%s: skipped, about %.0f s needed, %.0f s left", config.label, need, left)
            continue
        run_dir = work / "runs" / config.slug
        t0 = time.monotonic()
        rc = launch(config, common, run_dir, plan.steps, work / f"{config.slug}.log",
                    max(left, 60.0))  # fmt: skip
        row.update(exit=rc, seconds=time.monotonic() - t0)
        row["status"] = "ok" if rc == 0 else "timed out" if rc == 124 else f"failed (exit {rc})"
        if rc == 0:
            row.update(measure(run_dir))
            if config.recipe not in flops:
                flops[config.recipe] = train_flops_per_image(config.recipe, common)
            row["train_gflops_per_image"] = flops[config.recipe] / 1e9
            if peak and row["images_per_s"]:
                row["mfu"] = mfu(flops[config.recipe], row["images_per_s"], peak)
        logger.info("%s: %s in %.0f s", config.label, row["status"], row["seconds"])
        if i == 0:
            checks.update(resume_check(config, common, run_dir, plan, work, rc))
    code, summary = verdict(rows, checks)
    doc = {"title": title(env_info, plan), "stamp": stamp(), "env": env_info,
           "peak_bf16_tflops": peak, "batch": plan.batch, "steps": plan.steps,
           "log_every": plan.log_every, "budget_s": a.budget,
           "elapsed_s": time.monotonic() - start, "configs": rows, "checks": checks,
           "skipped": [r["config"] for r in rows if r["status"] == "skipped (budget)"],
           "ok": code == EXIT_OK, "exit": code, "summary": summary, "smoke": a.cpu_smoke,
           "plan": asdict(plan)}  # fmt: skip
    write_results(a.out, work, doc)
    return code


def prepare_data(work: Path, plan: Plan) -> Path:
    src, shards = work / "src", work / "shards"
    if not (shards / "manifest.json").is_file():
        make_data(src, plan.images, 150)
        cmd = [sys.executable, "-m", "toolkit.shard", str(src), str(shards), "--val-fraction",
               "0.05", "--shard-size", "250", "--workers", "4"]  # fmt: skip
        if run(cmd, work / "shard.log", 300):
            sys.exit(f"toolkit.shard failed; see {work / 'shard.log'}")
    return shards


def resume_check(config: Config, common: list[str], run_dir: Path, plan: Plan, work: Path,
                 first_exit: int) -> dict[str, bool]:  # fmt: skip
    """The first configuration, one log window further: it must resume from its last step, and
    log each step it logs once."""
    name = "resume resumed from the last checkpoint"
    if first_exit != 0:
        return {name: False}
    more = plan.steps + plan.log_every
    rc = launch(config, common, run_dir, more, work / "resume.log", 300)
    text = (work / "resume.log").read_text(errors="replace")
    resumed = bool(re.search(rf"resumed from \S+ \(step {plan.steps},", text))
    return {name: rc == 0 and resumed,
            "every logged step logged once": logged_steps(run_dir)
            == [*expected_log_steps(plan.steps, plan.log_every),
                *range(plan.steps + plan.log_every, more + 1, plan.log_every)]}  # fmt: skip


def write_results(out: Path, work: Path, doc: dict[str, Any]) -> None:
    (out / "gpu.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    (out / "gpu.md").write_text(md)
    with tarfile.open(out / "gpu-logs.tar.gz", "w:gz") as tar:
        for path in [*work.glob("*.log"), *(work / "runs").glob("*/metrics.jsonl")]:
            tar.add(path, arcname=str(path.relative_to(work)))
    sys.stdout.write(md)


if __name__ == "__main__":
    sys.exit(main())
