#!/usr/bin/env bash
# GPU check in one call (no network needed there): installs from a bundle what the GPU machine
# lacks, then measures with benchmarks/gpu.py, within a budget of about 8 minutes, on whatever
# torch the machine has (the bundle holds no torch, and its wheels go in without dependencies):
#
#   bash benchmarks/gpu.sh [--bundle DIR] [--budget 450] [--steps 40] [--log-every 10] [--python PY]
#   bash benchmarks/gpu.sh --cpu-smoke          # the same script on the CPU, tiny: it works
#
# The bundle is made beforehand, on a machine with the package registry, by
# `bash benchmarks/gpu_bundle.sh .gpu-bundle` (wheels for Python 3.12 on x86-64 Linux, a
# pure-Python DeepSpeed wheel built from its source; under 64 MB); the device tool carries it
# (`carry: [.gpu-bundle]`). Results: $OUT/gpu.json, $OUT/gpu.md, $OUT/gpu-logs.tar.gz (where $OUT
# is unset: benchmarks/results/gpu/). Exit status: 0 every configuration ran and every check
# passed; 3 every check that ran passed, some configurations skipped for the budget (gpu.json
# lists them); 1 a configuration or a check failed, or a package is missing; 2 bad arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=""
SMOKE=""
PY="${PYTHON:-}"
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bundle) BUNDLE="${2:?--bundle needs a folder}"; shift 2 ;;
        --cpu-smoke) SMOKE=1; ARGS+=(--cpu-smoke); shift ;;
        --budget | --steps | --log-every) ARGS+=("$1" "${2:?$1 needs a number}"); shift 2 ;;
        --python) PY="${2:?--python needs a path}"; shift 2 ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) printf 'gpu.sh: unknown argument %q (see --help)\n' "$1" >&2; exit 2 ;;
    esac
done
if [[ -z "$PY" ]]; then
    if [[ -n "$SMOKE" && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY="$(command -v python3)"; fi
fi
if [[ -z "$BUNDLE" && -z "$SMOKE" && -d .gpu-bundle ]]; then BUNDLE=.gpu-bundle; fi
if [[ -n "$BUNDLE" ]]; then
    # Into a folder of its own, not over the image's packages: only what is missing is there.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/srmae-site "$BUNDLE"/*.whl
    export PYTHONPATH="/tmp/srmae-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import torch, accelerate, deepspeed, webdataset, submitit, yaml, safetensors' \
    || { echo "gpu.sh: a package is missing: make the bundle (benchmarks/gpu_bundle.sh) and pass --bundle" >&2; exit 1; }
OUT_DIR="${OUT:-benchmarks/results/gpu}"
if [[ -n "$SMOKE" ]]; then OUT_DIR="${OUT:-$(mktemp -d)}"; fi
exec "$PY" -m benchmarks.gpu "$OUT_DIR" "${ARGS[@]}"
