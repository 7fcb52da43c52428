#!/usr/bin/env bash
# The project's one-call accelerator check, for the device machine (see docs/benchmarks.md, "GPU").
#
# That machine has torch, transformers, accelerate, safetensors, typer... but not diffusers, and it
# cannot download. Here, before the call, fetch diffusers' wheel into an ignored folder:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# then run, with `.whl` carried:   bash scripts/gpu_check.sh   (fp16, 512x512; give it timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 scripts/gpu_check.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.txt"
