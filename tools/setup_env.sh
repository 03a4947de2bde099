#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment: torch held at one build, then
# megatron_pr2 with its pinned dependencies and the dev tools. Idempotent.
#   --with-sglang  also build SGLang's own CPU venv (tools/sglang_env.sh; for the SGLang tests)
#   VENV=path   where to put it (default: .venv in the repository)
#   SGLANG_VENV=path  where to put SGLang's (default: .venv-sglang in the repository)
#   TORCH_SPEC  what torch to install when none is present (default: torch==2.13.0, the CPU wheel)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $torch_spec"
  "${pip[@]}" install "$torch_spec"
fi
constraints="$venv/torch-constraints.txt"
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
echo "[setup] installing megatron_pr2 (holding $(cat "$constraints"))"
"${pip[@]}" install -c "$constraints" -e "$repo[dev]"
echo "[setup] ready: $venv"
if [ "${1:-}" = "--with-sglang" ]; then
  VENV="${SGLANG_VENV:-$repo/.venv-sglang}" bash "$repo/tools/sglang_env.sh"
elif [ -n "${1:-}" ]; then
  echo "[setup] unknown option $1 (use --with-sglang)" >&2
  exit 2
fi
