"""The GPU check's measurements, driven by benchmarks/gpu.sh (which installs what is missing):
training throughput for DDP and ZeRO-2, SR-MAE and the MAE, bf16, compiled and not; peak
memory; model FLOP utilisation; an exact-resume check; the GPU-binding check.

    python -m benchmarks.gpu OUT_DIR [--cpu-smoke] [--budget 450] [--steps 60]

Each configuration is one `toolkit.launch RECIPE --local` run on synthetic 150x150 / 75x75 pairs;
images/s and the data-wait share are the medians of its logged steps after the warm-up, peak
memory the largest `train/peak_memory_gb` it logged (torch's allocator), MFU 3 x forward FLOPs
(FlopCounterMode, one batch) x images/s over the device's bf16 dense peak. Configurations run in
order of importance and are skipped, and said so, when the budget would not hold them. Writes
at most three files into OUT_DIR: gpu.json, gpu.md and gpu-logs.tar.gz.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# bf16 dense peak in TFLOP/s by device name (first match wins).
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
         ("GH200", 989.4), ("A100", 312.0)]  # fmt: skip
# (name, recipe, backend overrides, compiled); the order is the order of importance.
CONFIGS = [
    ("sr zero2", "recipes/finetune.yaml", ["deepspeed.zero_stage=2"], False),
    ("mae zero2", "recipes/pretrain.yaml", ["deepspeed.zero_stage=2"], False),
    ("sr ddp", "recipes/finetune.yaml", ["deepspeed=null"], False),
    ("mae ddp", "recipes/pretrain.yaml", ["deepspeed=null"], False),
    ("sr zero2 compiled", "recipes/finetune.yaml", ["deepspeed.zero_stage=2"], True),
    ("sr ddp compiled", "recipes/finetune.yaml", ["deepspeed=null"], True),
    ("mae zero2 compiled", "recipes/pretrain.yaml", ["deepspeed.zero_stage=2"], True),
    ("mae ddp compiled", "recipes/pretrain.yaml", ["deepspeed=null"], True),
]


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


def run(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> int:
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=ROOT, env={**os.environ, **(env or {})})  # fmt: skip
            return proc.returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu.py] killed after {timeout:.0f} s\n")
            return 124


def forward_flops(recipe_path: str, overrides: list[str], batch: int) -> float | None:
    """Forward FLOPs per image of the recipe's model, counted on one batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.engine.model import build_model
    from toolkit.runs import recipe
    from toolkit.tasks import Placement, task_of

    r = recipe.load(ROOT / recipe_path, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(r).to(device)
    side = r.model.img_size
    hr = torch.rand(batch, r.model.in_chans, side, side, device=device)
    batch_ = {"key": [str(i) for i in range(batch)], "hr": hr,
              "lr": hr[..., ::r.data.scale, ::r.data.scale].contiguous()}  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        task_of(r).losses(model, batch_, Placement(device), torch.Generator().manual_seed(0))
    return counter.get_total_flops() / batch


def measure(run_dir: Path, warm: int) -> dict[str, Any]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    steps = [x for x in lines if "train/loss" in x and x["step"] > warm]
    ips = [x["train/images_per_s"] for x in steps if x.get("train/images_per_s")]
    wait = [x["train/data_wait"] for x in steps if x.get("train/data_wait") is not None]
    peak = [x["train/peak_memory_gb"] for x in lines if "train/peak_memory_gb" in x]
    return {"images_per_s": statistics.median(ips) if ips else None,
            "data_wait_share": statistics.median(wait) if wait else None,
            "peak_memory_gb": max(peak) if peak else None,
            "steps_logged": [x["step"] for x in lines if "train/loss" in x]}  # fmt: skip


def binding_check(work: Path) -> dict[str, Any]:
    """A process bound to one GPU with a local rank that would not exist: it takes device 0."""
    code = ("import os, torch; from toolkit.cluster import devices; d = devices.bind(); "
            "print(d, os.environ['LOCAL_RANK'], torch.cuda.current_device() if d == 'cuda' "
            "else '-')")  # fmt: skip
    env = {"CUDA_VISIBLE_DEVICES": "0", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}
    rc = run([sys.executable, "-c", code], work / "binding.log", 120, env)
    text = (work / "binding.log").read_text().strip().splitlines()
    return {"exit": rc, "printed": text[-1] if text else "", "ok": rc == 0 and bool(text)
            and text[-1].split() == ["cuda", "0", "0"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU: the script works")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything")
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args(argv)
    start = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_WORK", "/tmp/srmae-gpu"))
    work.mkdir(parents=True, exist_ok=True)
    smoke = a.cpu_smoke
    count, batch, workers, warm = (48, 4, 1, 1) if smoke else (4000, 64, 8, 10)
    steps = 4 if smoke else a.steps
    size = ["model.img_size=32", "model.patch_size=4", "model.embed_dim=32", "model.depth=1",
            "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
            "model.decoder_num_heads=2"] if smoke else []  # fmt: skip
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env_info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    src, shards = work / "src", work / "shards"
    if not (shards / "manifest.json").is_file():
        make_data(src, count, 150)
        cmd = [sys.executable, "-m", "toolkit.shard", str(src), str(shards), "--val-fraction",
               "0.05", "--shard-size", "250", "--workers", "4"]  # fmt: skip
        rc = run(cmd, work / "shard.log", 300)
        if rc:
            sys.exit(f"toolkit.shard failed; see {work / 'shard.log'}")
    common = [f"data.shards={shards}", f"data.batch_size={batch}", f"data.num_workers={workers}",
              "train.precision=bf16", "train.eval_every=1000000", "train.log_every=1",
              f"train.checkpoint_every={steps}", "init.from=null", "freeze=[]",
              "cluster.gpus_per_node=1", *size]  # fmt: skip
    name = env_info["device"]
    peak = next((v for k, v in PEAKS if k in name), None)
    results, skipped = [], []
    for label, recipe_path, backend, compiled in CONFIGS[: 5 if smoke else None]:
        left = a.budget - (time.monotonic() - start)
        need = 150 if compiled else 60
        if left < need:
            skipped.append(label)
            continue
        run_dir = work / "runs" / label.replace(" ", "-")
        overrides = [*common, *backend, f"run.dir={run_dir}", f"train.max_steps={steps}",
                     f"train.compile={str(compiled).lower()}"]  # fmt: skip
        t0 = time.monotonic()
        log = work / f"{label.replace(' ', '-')}.log"
        rc = run([sys.executable, "-m", "toolkit.launch", recipe_path, "--local", *overrides],
                 log, min(left, 300))  # fmt: skip
        row: dict[str, Any] = {"config": label, "exit": rc, "seconds": time.monotonic() - t0}
        if rc == 0:
            row.update(measure(run_dir, warm))
            fwd = forward_flops(recipe_path, [*common, *backend], batch)
            row["forward_gflops_per_image"] = fwd / 1e9 if fwd else None
            if fwd and peak and row["images_per_s"]:
                row["mfu"] = 3 * fwd * row["images_per_s"] / (peak * 1e12)
        results.append(row)
    # Resume: the first configuration, 20 steps further; it must resume from its last step.
    checks: dict[str, bool] = {f"{r['config']} ran": r["exit"] == 0 for r in results}
    first = CONFIGS[0]
    run_dir = work / "runs" / first[0].replace(" ", "-")
    if results and results[0]["exit"] == 0:
        more = steps + (2 if smoke else 20)
        rc = run([sys.executable, "-m", "toolkit.launch", first[1], "--local", *common,
                  *first[2], f"run.dir={run_dir}", f"train.max_steps={more}"],
                 work / "resume.log", 300)  # fmt: skip
        text = (work / "resume.log").read_text(errors="replace")
        logged = measure(run_dir, 0)["steps_logged"]
        checks["resume resumed from the last checkpoint"] = rc == 0 and bool(
            re.search(rf"resumed from \S+ \(step {steps},", text)
        )
        checks["every step logged once"] = sorted(logged) == list(range(1, more + 1))
    if not smoke:
        binding = binding_check(work)
        checks["one visible GPU, local rank 3: device 0"] = binding["ok"]
    doc = {"env": env_info, "peak_bf16_tflops": peak, "batch": batch, "steps": steps,
           "results": results, "skipped": skipped, "checks": checks,
           "ok": all(checks.values()) and not skipped, "smoke": smoke}  # fmt: skip
    (a.out / "gpu.json").write_text(json.dumps(doc, indent=2) + "\n")
    cols = ["config", "images_per_s", "data_wait_share", "peak_memory_gb", "mfu", "seconds", "exit"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        md.append("| " + " | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float)
                                    else str(r.get(c, "-")) for c in cols) + " |")  # fmt: skip
    md += ["", *(f"- {k}: {'ok' if v else 'FAILED'}" for k, v in checks.items())]
    md += [f"- skipped (budget): {', '.join(skipped)}"] if skipped else []
    (a.out / "gpu.md").write_text("\n".join(md) + "\n")
    with tarfile.open(a.out / "gpu-logs.tar.gz", "w:gz") as tar:
        for path in [*work.glob("*.log"), *(work / "runs").glob("*/metrics.jsonl")]:
            tar.add(path, arcname=str(path.relative_to(work)))
    sys.stdout.write("\n".join(md) + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
