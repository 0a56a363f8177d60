#!/usr/bin/env bash
# GPU check: the workload-size SR-MAE, ZeRO-2 + bf16 on one GPU, a few hundred steps; images/s,
# peak memory, model FLOP utilisation, and a resume. One call, no network, under 8 minutes.
#
#   bash benchmarks/gpu.sh [--wheels DIR] [--steps 300] [--python PY] [--peak-tflops T]
#                          [--budget 450] [--lensing] [--keep]
#   bash benchmarks/gpu.sh --cpu-smoke [--precision no|bf16]   # the same steps on the CPU, tiny
#
# Steps: synthetic paired data (smooth random 150x150 HR, 2x2-mean 75x75 LR; or the lensing
# generator with --lensing) -> toolkit.shard -> FLOPs per image (FlopCounterMode, one batch) ->
# toolkit.launch recipes/finetune.yaml --local (init.from=null, freeze=[], ZeRO-2, bf16,
# max_steps=STEPS, checkpoint every STEPS/2, log every step) with nvidia-smi sampling memory ->
# the same command with max_steps=STEPS+50, which must resume from step STEPS and log steps
# STEPS+1..STEPS+50 once each -> summary table + JSON: $OUT/gpu.json when $OUT is set (the
# device tool copies $OUT back, with the logs and metrics.jsonl under $OUT/gpu-logs/), else
# benchmarks/results/gpu.json ($WORK/gpu.json for --cpu-smoke). Exit 0 only when every check
# passed. The training process does not report its own peak memory: the figure is nvidia-smi's
# memory.used maximum (CUDA context included) plus, for reference, torch's peak allocation of one
# bare fp32-master/bf16-autocast step of the same model and batch outside DeepSpeed.
#
# Python: $PYTHON, else --python, else python3 from PATH (never the repository's CPU .venv, except
# for --cpu-smoke). torch with CUDA, accelerate, deepspeed, transformers, webdataset, pyyaml,
# safetensors, tensorboard, numpy, pillow and tqdm must import; --wheels DIR installs the missing
# ones from DIR with pip --no-index.
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

WHEELS=""
SMOKE=0
STEPS=""
PY="${PYTHON:-}"
PEAK_TFLOPS=""
BUDGET=450
LENSING=0
KEEP=0
PRECISION=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --cpu-smoke) SMOKE=1; shift ;;
        --steps) STEPS="${2:?--steps needs a number}"; shift 2 ;;
        --python) PY="${2:?--python needs a path}"; shift 2 ;;
        --peak-tflops) PEAK_TFLOPS="${2:?--peak-tflops needs a number}"; shift 2 ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
        --lensing) LENSING=1; shift ;;
        --precision) PRECISION="${2:?--precision needs no or bf16}"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'gpu.sh: unknown argument %q (see --help)\n' "$1" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."  # the repository root: python -m toolkit.* resolves from here
START=$SECONDS

say() { printf '[gpu.sh %5ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { say "FAILED: $*"; exit 1; }

# Each step gets its own limit, cut to what is left of the whole budget.
limit() {
    local want="$1" left=$((BUDGET - (SECONDS - START)))
    ((left < 5)) && left=5
    ((want < left)) && echo "$want" || echo "$left"
}

if ((SMOKE)); then
    PAIRS=48; BATCH=4; WORKERS=1; PRECISION="${PRECISION:-no}"; STEPS="${STEPS:-4}"; EXTRA=2
    SHARD_SIZE=8; SHARD_WORKERS=1; WARM=1
    if [[ -z "$PY" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
else
    PAIRS=4000; BATCH=64; WORKERS=8; PRECISION="${PRECISION:-bf16}"; STEPS="${STEPS:-300}"; EXTRA=50
    SHARD_SIZE=250; SHARD_WORKERS=8; WARM=20
fi
CKPT_EVERY=$((STEPS / 2))
((CKPT_EVERY > 0)) || die "--steps must be 2 or more"
TOTAL=$((STEPS + EXTRA))
if [[ -z "$PY" ]]; then
    PY="$(command -v python3 || command -v python || true)"
fi
[[ -n "$PY" ]] || die "no python3 on PATH; pass --python or set PYTHON"

WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/srmae-gpu.XXXXXX")}"
mkdir -p "$WORK"
SMI_PID=""
cleanup() {
    if [[ -n "$SMI_PID" ]]; then kill "$SMI_PID" 2>/dev/null || true; fi
    if ((KEEP == 0)) && [[ "$WORK" == */srmae-gpu.* ]]; then
        rm -rf -- "$WORK/src" "$WORK/shards"  # the bulky part; logs and the run stay
    fi
}
trap cleanup EXIT

# --- 1. packages --------------------------------------------------------------------------------
MODULES=(torch accelerate deepspeed transformers webdataset yaml safetensors tensorboard numpy PIL tqdm)
missing() {
    "$PY" - "${MODULES[@]}" <<'PY'
import importlib.util
import sys

pip_name = {"yaml": "pyyaml", "PIL": "pillow"}
gone = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
sys.stdout.write(" ".join(pip_name.get(m, m) for m in gone))
PY
}
say "python: $PY ($("$PY" --version 2>&1)); work dir: $WORK"
MISSING="$(missing)"
if [[ -n "$MISSING" && -n "$WHEELS" ]]; then
    say "installing from $WHEELS: $MISSING"
    # shellcheck disable=SC2086  # a list of package names
    timeout "$(limit 180)" "$PY" -m pip install --no-index --find-links "$WHEELS" $MISSING \
        || die "pip could not install $MISSING from $WHEELS"
    MISSING="$(missing)"
fi
if [[ -n "$MISSING" ]]; then
    die "missing Python packages: $MISSING. Carry wheels for them (built for this Python) and pass --wheels DIR"
fi
timeout "$(limit 120)" "$PY" -c 'import torch, accelerate, deepspeed' >"$WORK/import.log" 2>&1 \
    || { tail -n 20 "$WORK/import.log"; die "python -c 'import torch, accelerate, deepspeed' failed"; }
timeout "$(limit 60)" "$PY" - "$WORK/env.json" <<'PY' >>"$WORK/import.log" 2>&1 \
    || { tail -n 20 "$WORK/import.log"; die "could not read the torch/CUDA versions"; }
import json
import sys

import accelerate
import deepspeed
import torch

cuda = torch.cuda.is_available()
info = {
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "accelerate": accelerate.__version__,
    "deepspeed": deepspeed.__version__,
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "cuda_available": cuda,
    "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
}
with open(sys.argv[1], "w") as f:
    json.dump(info, f)
PY
ENV_JSON="$(cat "$WORK/env.json")"
say "environment: $ENV_JSON"
if ((SMOKE == 0)); then
    grep -q '"cuda_available": true' <<<"$ENV_JSON" \
        || die "torch sees no CUDA GPU (a CPU-only torch? the repository's .venv is CPU-only): $ENV_JSON"
fi

# --- 2. data -----------------------------------------------------------------------------------
SRC="$WORK/src"
SHARDS="$WORK/shards"
rm -rf -- "$SRC" "$SHARDS"
if ((LENSING)); then
    say "generating $PAIRS lensing pairs with toolkit.data.lensing"
    timeout "$(limit 240)" "$PY" -m toolkit.data.lensing "$SRC" --count "$PAIRS" --workers 16 \
        >"$WORK/data.log" 2>&1 || { tail -n 20 "$WORK/data.log"; die "lensing data"; }
else
    say "generating $PAIRS smooth random pairs (150x150 HR, 75x75 LR)"
    timeout "$(limit 120)" "$PY" - "$SRC" "$PAIRS" <<'PY' >"$WORK/data.log" 2>&1 \
        || { tail -n 20 "$WORK/data.log"; die "synthetic data"; }
import sys
from pathlib import Path

import numpy as np

out, count = Path(sys.argv[1]), int(sys.argv[2])
(out / "hr").mkdir(parents=True)
(out / "lr").mkdir(parents=True)
rng = np.random.default_rng(0)
side, blobs, chunk = 150, 6, 100
yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
for start in range(0, count, chunk):
    n = min(chunk, count - start)
    cy, cx = rng.random((2, n, blobs, 1, 1), dtype=np.float32)
    sy, sx = 0.02 + 0.15 * rng.random((2, n, blobs, 1, 1), dtype=np.float32)
    amp = rng.random((n, blobs, 1, 1), dtype=np.float32)
    img = (amp * np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))).sum(1)
    img /= img.max(axis=(1, 2), keepdims=True)
    img = 0.03 + 0.94 * img + rng.normal(0, 0.005, img.shape).astype(np.float32)
    hr = np.clip(img, 0, 1).astype(np.float32)
    lr = hr.reshape(n, side // 2, 2, side // 2, 2).mean(axis=(2, 4)).astype(np.float32)
    for i in range(n):
        np.save(out / "hr" / f"{start + i:06d}.npy", hr[i])
        np.save(out / "lr" / f"{start + i:06d}.npy", lr[i])
sys.stdout.write(f"wrote {count} pairs to {out}\n")
PY
fi
say "sharding"
timeout "$(limit 120)" "$PY" -m toolkit.shard "$SRC" "$SHARDS" --val-fraction 0.05 \
    --shard-size "$SHARD_SIZE" --workers "$SHARD_WORKERS" >"$WORK/shard.log" 2>&1 \
    || { tail -n 20 "$WORK/shard.log"; die "toolkit.shard"; }

# --- 3. FLOPs per image ------------------------------------------------------------------------
RUN="$WORK/run"
OVERRIDES=(
    "init.from=null" "freeze=[]" "deepspeed.zero_stage=2" "train.precision=$PRECISION"
    "data.batch_size=$BATCH" "data.num_workers=$WORKERS" "data.shards=$SHARDS" "run.dir=$RUN"
    "train.eval_every=1000000" "train.checkpoint_every=$CKPT_EVERY" "train.log_every=1"
)
say "counting FLOPs of one batch"
timeout "$(limit 120)" "$PY" - "$WORK/flops.json" "$BATCH" "$PRECISION" "${OVERRIDES[@]}" \
    <<'PY' >"$WORK/flops.log" 2>&1 || { tail -n 20 "$WORK/flops.log"; say "FLOP count failed: no MFU"; }
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from toolkit import recipe
from toolkit.runs import build_model

out, batch, precision, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
r = recipe.load("recipes/finetune.yaml", [*overrides, "train.max_steps=1"])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
model = build_model(r).to(device)
side = r.model.img_size // r.data.scale
lr = torch.rand(batch, r.model.in_chans, side, side, device=device)
hr = torch.rand(batch, r.model.in_chans, r.model.img_size, r.model.img_size, device=device)


def autocast() -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


with torch.no_grad(), autocast(), FlopCounterMode(display=False) as fwd:
    model(lr)
if device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
with FlopCounterMode(display=False) as both:
    with autocast():
        loss = torch.nn.functional.l1_loss(model(lr).float(), hr)
    loss.backward()
peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
result = {
    "batch": batch,
    "forward_flops_per_image": fwd.get_total_flops() / batch,
    "fwd_bwd_flops_per_image_counted": both.get_total_flops() / batch,
    "bare_step_peak_allocated_mib": peak,
    "params": sum(p.numel() for p in model.parameters()),
}
with open(out, "w") as f:
    json.dump(result, f)
sys.stdout.write(json.dumps(result) + "\n")
PY

# --- 4. train, then resume ---------------------------------------------------------------------
rm -rf -- "$RUN"
sample_memory() {  # nvidia-smi memory.used (MiB) every 200 ms into $1, in the background
    if command -v nvidia-smi >/dev/null 2>&1 && ((SMOKE == 0)); then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$1" 2>/dev/null &
        SMI_PID=$!
    fi
}
stop_sampling() {
    if [[ -n "$SMI_PID" ]]; then kill "$SMI_PID" 2>/dev/null || true; wait "$SMI_PID" 2>/dev/null || true; fi
    SMI_PID=""
}

say "training $STEPS steps: ZeRO-2, precision $PRECISION, batch $BATCH, $WORKERS loader workers"
sample_memory "$WORK/mem1.csv"
RC1=0
timeout --kill-after=20 "$(limit 240)" "$PY" -m toolkit.launch recipes/finetune.yaml --local \
    "${OVERRIDES[@]}" "train.max_steps=$STEPS" >"$WORK/train1.log" 2>&1 || RC1=$?
stop_sampling
tail -n 4 "$WORK/train1.log"
((RC1 == 0)) || { tail -n 30 "$WORK/train1.log"; die "training exited with $RC1"; }

say "resuming to step $TOTAL"
sample_memory "$WORK/mem2.csv"
RC2=0
timeout --kill-after=20 "$(limit 180)" "$PY" -m toolkit.launch recipes/finetune.yaml --local \
    "${OVERRIDES[@]}" "train.max_steps=$TOTAL" >"$WORK/train2.log" 2>&1 || RC2=$?
stop_sampling
tail -n 4 "$WORK/train2.log"
((RC2 == 0)) || tail -n 30 "$WORK/train2.log"

# --- 5. summary --------------------------------------------------------------------------------
if ((SMOKE)); then
    JSON_OUT="$WORK/gpu.json"
elif [[ -n "${OUT:-}" ]]; then
    JSON_OUT="$OUT/gpu.json"
else
    JSON_OUT="benchmarks/results/gpu.json"
fi
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/gpu-logs"
    cp -- "$WORK"/*.log "$RUN/metrics.jsonl" "$OUT/gpu-logs/" 2>/dev/null || true
    cp -- "$WORK"/mem*.csv "$OUT/gpu-logs/" 2>/dev/null || true
fi
STATUS=0
timeout "$(limit 60)" "$PY" - "$WORK" "$RUN" "$JSON_OUT" "$STEPS" "$TOTAL" "$WARM" "$BATCH" \
    "$RC2" "$PEAK_TFLOPS" "$WORK/env.json" "$SMOKE" <<'PY' || STATUS=$?
import json
import re
import statistics
import sys
from pathlib import Path

work, run, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
steps, total, warm, batch, rc2 = (int(x) for x in sys.argv[4:9])
peak_arg, smoke = sys.argv[9], sys.argv[11] == "1"
env = json.loads(Path(sys.argv[10]).read_text())

# bf16 dense peak, TFLOP/s, by the name nvidia-smi/torch give (first match wins).
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
         ("GH200", 989.4), ("A100", 312.0)]
checks: dict[str, bool] = {}

lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
train = [x for x in lines if "train/loss" in x]
steps_logged = [x["step"] for x in train]
first = [x for x in train if x["step"] <= steps]
ips = [x["train/images_per_s"] for x in first if x["step"] > warm and x.get("train/images_per_s")]
images_per_s = statistics.median(ips) if ips else None
# Cross-check by wall clock: logged times of consecutive steps, intervals with a checkpoint or an
# eval in them left out.
busy = {x["step"] for x in lines if any(k.startswith(("checkpoint/", "val/")) for k in x)}
t = {x["step"]: x["time"] for x in first}
gaps = [t[s] - t[s - 1] for s in sorted(t) if s > warm and s - 1 in t and s - 1 not in busy]
wall_ips = batch / statistics.median(gaps) if gaps else None

checks["first run logged steps 1..N once each"] = (
    sorted(s for s in steps_logged if s <= steps) == list(range(1, steps + 1))
)
log2 = (work / "train2.log").read_text(errors="replace")
resumed = re.search(r"resumed from \S+ \(step (\d+)", log2)
checks["resume run exited 0"] = rc2 == 0
checks[f"resume log says 'resumed from' step {steps}"] = bool(resumed) and int(resumed[1]) == steps
after = [s for s in steps_logged if s > steps]
checks[f"metrics.jsonl has steps {steps + 1}..{total} once each"] = (
    sorted(after) == list(range(steps + 1, total + 1))
)
latest = run / "checkpoints" / "latest"
checks[f"latest checkpoint is step {total}"] = (
    latest.is_file() and latest.read_text().strip().endswith(f"{total:08d}")
)
checks["model.safetensors exported"] = (run / "model.safetensors").is_file()
losses = [x["train/loss"] for x in train]
checks["losses finite"] = all(v is not None for v in losses)

def max_mib(path: Path) -> float | None:
    if not path.is_file():
        return None
    vals = [float(v) for v in path.read_text().split() if v.strip().replace(".", "").isdigit()]
    return max(vals) if vals else None

flops = {}
if (work / "flops.json").is_file():
    flops = json.loads((work / "flops.json").read_text())
fwd = flops.get("forward_flops_per_image")
train_flops = 3 * fwd if fwd else None
name = env.get("device", "")
peak = float(peak_arg) if peak_arg else next((p for k, p in PEAKS if k in name), None)
mfu = train_flops * images_per_s / (peak * 1e12) if train_flops and images_per_s and peak else None
resume_s = next((x["resume/seconds"] for x in lines if "resume/seconds" in x), None)
ckpt_s = [x["checkpoint/seconds"] for x in lines if "checkpoint/seconds" in x]
result = {
    "what": "SR-MAE (recipes/finetune.yaml, everything trainable), ZeRO-2, one process"
    + (" -- CPU SMOKE, not a GPU measurement" if smoke else ""),
    "env": env,
    "steps": steps,
    "resume_to": total,
    "batch": batch,
    "images_per_s_median": images_per_s,
    "images_per_s_wall": wall_ips,
    "peak_memory_nvidia_smi_mib": max_mib(work / "mem1.csv"),
    "peak_memory_nvidia_smi_resume_mib": max_mib(work / "mem2.csv"),
    "bare_step_peak_allocated_mib": flops.get("bare_step_peak_allocated_mib"),
    "forward_gflops_per_image": fwd / 1e9 if fwd else None,
    "train_gflops_per_image_3x_forward": train_flops / 1e9 if train_flops else None,
    "train_gflops_per_image_counted": (flops["fwd_bwd_flops_per_image_counted"] / 1e9
                                       if flops else None),
    "peak_bf16_tflops": peak,
    "mfu": mfu,
    "checkpoint_seconds": ckpt_s,
    "resume_seconds": resume_s,
    "first_loss": losses[0] if losses else None,
    "last_loss": losses[-1] if losses else None,
    "checks": checks,
    "ok": all(checks.values()),
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")

def cell(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

rows = [(k, cell(v)) for k, v in result.items() if k not in ("checks", "env")]
rows += [("env." + k, cell(v)) for k, v in env.items()]
rows += [("check: " + k, "ok" if v else "FAILED") for k, v in checks.items()]
width = max(len(k) for k, _ in rows)
sys.stdout.write("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + f"\nwrote {out}\n")
sys.exit(0 if result["ok"] else 1)
PY
if ((STATUS == 0)); then say "all checks passed"; else say "SOME CHECKS FAILED (exit $STATUS)"; fi
exit "$STATUS"
