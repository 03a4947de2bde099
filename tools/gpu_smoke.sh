#!/usr/bin/env bash
# The GPU smoke suite (tests/gpu) on one CUDA machine, offline: bf16 training for every routing
# method, torchrun + NCCL over all local GPUs, and (when TransformerEngine is installed) the TE
# spec with replayed routes and FP8 against bf16.
#
# Needs: Python 3.11/3.12 with a CUDA build of torch, transformers, pytest, pytest-timeout.
# megatron-core, when missing, is installed from a local wheel folder (no network):
#
#   # once, on a machine with network access (the wheel is ~2.6 MB):
#   pip download megatron-core==0.16.1 --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d wheels/
#
# The project itself runs from this checkout (PYTHONPATH); nothing else is installed.
# Usage: bash tools/gpu_smoke.sh [WHEEL_DIR]     (default WHEEL_DIR: wheels/)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${1:-wheels}
SITE=${GPU_SMOKE_SITE:-${TMPDIR:-/tmp}/megatron_pr2_gpu_site}

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_smoke: CUDA is not available to $PYTHON" >&2; exit 1; }

if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_smoke: megatron-core is not installed and $WHEELS/ holds no wheels (see the" \
             "pip download command at the top of this script)" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
        "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec timeout 470 "$PYTHON" -m pytest -q -ra -p no:cacheprovider tests/gpu
