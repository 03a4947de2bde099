#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment: torch held at one build, then
# megatron_pr2 with its pinned dependencies and the dev tools. Idempotent.
#   --with-sglang  also build SGLang's own CPU venv (tools/sglang_env.sh; for the SGLang tests)
#   VENV=path   where to put it (default: .venv in the repository)
#   SGLANG_VENV=path  where to put SGLang's (default: .venv-sglang in the repository)
#   TORCH_SPEC  what torch to install when none is present (default: torch==2.13.0, the CPU wheel)
#   PYTHON      interpreter for the venv (default: python3.11)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
# shellcheck source=tools/torch_venv.sh
source "$repo/tools/torch_venv.sh"

torch_venv "$venv" setup
echo "[setup] installing megatron_pr2 (holding $(cat "$constraints"))"
"${pip[@]}" install -c "$constraints" -e "$repo[dev]"
echo "[setup] ready: $venv"
if [ "${1:-}" = "--with-sglang" ]; then
  VENV="${SGLANG_VENV:-$repo/.venv-sglang}" bash "$repo/tools/sglang_env.sh"
elif [ -n "${1:-}" ]; then
  echo "[setup] unknown option $1 (use --with-sglang)" >&2
  exit 2
fi
