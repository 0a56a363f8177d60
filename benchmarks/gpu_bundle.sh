#!/usr/bin/env bash
# What the GPU machine lacks, fetched and built here into one folder for the device tool to
# carry (it has no network): wheels for its Python (3.12, x86-64 Linux) of the packages its
# image does not hold, and DeepSpeed, which has no wheel on the registry, built from its source
# as pure Python (its CUDA ops compile on first use there, with the image's nvcc).
#
#   bash benchmarks/gpu_bundle.sh [DIR]        # default .gpu-bundle (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu-bundle}"
PY="${PYTHON:-python3}"
rm -rf "$DIR" && mkdir -p "$DIR"
# Missing from the image (its package list: the device tool's KINDS.md), with their needs.
WHEELS=(webdataset==1.0.2 braceexpand submitit==1.5.4 hjson pydantic pydantic-core annotated-types
        typing-inspection)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DIR" "${WHEELS[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary deepspeed -w "$DIR" deepspeed==0.19.8
# The check runs on the machine's own torch, whatever its release: none travels in the bundle.
if compgen -G "$DIR/torch-*.whl" >/dev/null; then
    echo "gpu_bundle.sh: a torch wheel in $DIR" >&2; exit 1
fi
size=$(du -sm "$DIR" | cut -f1)
echo "gpu_bundle.sh: $(ls "$DIR" | wc -l) wheels, ${size} MB in $DIR"
if ((size >= 64)); then echo "gpu_bundle.sh: over the 64 MB the device tool carries" >&2; exit 1; fi
