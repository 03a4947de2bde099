#!/usr/bin/env bash
# The GPU smoke suite (tests/gpu) on one CUDA machine, set up from the package index alone.
#
# 1. Without CUDA it stops at once ("CUDA is not available"), before installing anything.
# 2. A venv (GPU_SMOKE_VENV, default .venv-gpu in the checkout) that sees the machine's own CUDA
#    torch (--system-site-packages), with this project and its dependencies (megatron-core ...)
#    and the test tools (pytest, pytest-timeout): `pip install -e .[dev]`, torch held as found.
# 3. TransformerEngine, unless importable: `pip install --no-build-isolation
#    transformer-engine[pytorch]` (no binary wheel matches most torch builds: it compiles
#    against this torch and needs the CUDA toolkit (nvcc) and cuDNN headers; bounded by
#    TE_INSTALL_TIMEOUT seconds, default 1800). When that fails the script says what is missing
#    and the TE tests skip; REQUIRE_TE=1 makes a missing TE fail the suite instead.
# 4. With WITH_SGLANG=1 (before TE, so that TE builds against the final torch): SGLang at the
#    version the weight sync is pinned to (SGLANG_VERSION in megatron_pr2/rollout/
#    sglang_weight_api.py), unless already there: `pip install sglang==<pin>` with all its
#    dependencies, the torch it pins included (it replaces the venv's torch where that differs),
#    flashinfer and sglang-kernel; bounded by SGLANG_INSTALL_TIMEOUT seconds, default 1800.
#    Without sglang the SGLang test skips; REQUIRE_SGLANG=1 makes that a failure.
# 5. pytest tests/gpu: bf16 training for every routing method, the recipe's flags, bf16 with the
#    SFT warm-up, torchrun + NCCL over all local GPUs, PP=2 when there are 2+ GPUs (NCCL refuses
#    two ranks on one device), placement on the GPU, with TE the TE spec with replayed routes
#    and FP8 against bf16, and with sglang a 2-iteration R3 run served by a real SGLang server
#    on the GPU (127.0.0.1, API key; the suite's time limit grows by 900 s).
#
# Usage: bash tools/gpu_smoke.sh     (PYTHON: the interpreter with CUDA torch, default python3)
#        WITH_SGLANG=1 REQUIRE_SGLANG=1 bash tools/gpu_smoke.sh     (the SGLang test too)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${GPU_SMOKE_VENV:-$PWD/.venv-gpu}
TE_INSTALL_TIMEOUT=${TE_INSTALL_TIMEOUT:-1800}
SGLANG_INSTALL_TIMEOUT=${SGLANG_INSTALL_TIMEOUT:-1800}
say() { echo "gpu_smoke: $*" >&2; }

cuda_check='import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_smoke: CUDA is not available to {sys.executable} (torch {torch.__version__}, "
             f"CUDA build {torch.version.cuda})")'
if "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -c "$cuda_check"
elif ! nvidia-smi -L >/dev/null 2>&1; then
  say "CUDA is not available: no NVIDIA driver answers (nvidia-smi) and $PYTHON has no torch"
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (it sees $PYTHON's packages, its CUDA torch included)"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
py="$VENV/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)
held="$VENV/torch-held.txt"
if "$py" -c "import torch" 2>/dev/null; then  # keep the CUDA torch that is there
  "$py" -c "import torch; print('torch==' + torch.__version__)" > "$held"
else
  : > "$held"
fi
say "installing megatron_pr2 with its dependencies and pytest, pytest-timeout ($(cat "$held"))"
"${pip[@]}" -c "$held" -e ".[dev]"
"$py" -c "$cuda_check"

sglang_version() { "$py" -c 'import importlib.metadata as m; print(m.version("sglang"))' 2>/dev/null; }
if [ "${WITH_SGLANG:-0}" = 1 ]; then
  pin=$(sed -n 's/^SGLANG_VERSION = "\(.*\)"$/\1/p' megatron_pr2/rollout/sglang_weight_api.py)
  [ -n "$pin" ] || { say "no SGLANG_VERSION pin in megatron_pr2/rollout/sglang_weight_api.py"; exit 1; }
  if [ "$(sglang_version)" != "$pin" ]; then
    say "installing sglang==$pin (WITH_SGLANG=1) with all its dependencies: the torch it pins" \
        "replaces $(cat "$held") where it differs, plus flashinfer and sglang-kernel (up to" \
        "${SGLANG_INSTALL_TIMEOUT} s)"
    if timeout "$SGLANG_INSTALL_TIMEOUT" "${pip[@]}" "sglang==$pin"; then
      "$py" -c "import torch; print('torch==' + torch.__version__)" > "$held"
      say "installed sglang $(sglang_version); torch is now $(cat "$held")"
      "$py" -c "$cuda_check" || { say "the torch that sglang==$pin pins cannot use this GPU"; exit 1; }
    else
      say "sglang==$pin could not be installed; the SGLang test" \
          "$([ "${REQUIRE_SGLANG:-0}" = 1 ] && echo fails \(REQUIRE_SGLANG=1\) || echo skips)"
    fi
  fi
fi

if ! "$py" -c "import transformer_engine.pytorch" 2>/dev/null; then
  say "installing TransformerEngine (compiles against this torch; up to ${TE_INSTALL_TIMEOUT} s)"
  if ! timeout "$TE_INSTALL_TIMEOUT" "${pip[@]}" -c "$held" --no-build-isolation \
      "transformer-engine[pytorch]"; then
    say "TransformerEngine could not be installed: it needs the CUDA toolkit (nvcc on PATH," \
        "CUDA_HOME) and cuDNN headers matching torch's CUDA $("$py" -c 'import torch; print(torch.version.cuda)');" \
        "the TE tests $([ "${REQUIRE_TE:-0}" = 1 ] && echo fail \(REQUIRE_TE=1\) || echo skip)"
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
suite_timeout=900
if [ -n "$(sglang_version)" ]; then suite_timeout=1800; fi  # the SGLang test: a start and a run
exec timeout "$suite_timeout" "$py" -m pytest -q -ra -p no:cacheprovider tests/gpu
