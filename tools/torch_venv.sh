# Sourced (not run) by tools/setup_env.sh and tools/sglang_env.sh: a virtual environment with
# torch held at one build.
#
#   torch_venv VENV TAG
#     creates VENV with $PYTHON (default python3.11, else python3) when it has no interpreter,
#     installs $TORCH_SPEC (default torch==2.13.0, the CPU wheel) when torch is missing, and
#     writes VENV/torch-constraints.txt pinning the torch it holds. Sets `pip` (an array: VENV's
#     quiet pip) and `constraints` (that file) for the caller. TAG prefixes the progress lines.
torch_venv() {
  local venv="$1" tag="$2"
  local torch_spec="${TORCH_SPEC:-torch==2.13.0}" python_bin="${PYTHON:-python3.11}"
  command -v "$python_bin" >/dev/null || python_bin=python3
  if [ ! -x "$venv/bin/python" ]; then
    echo "[$tag] creating virtual environment $venv"
    "$python_bin" -m venv "$venv"
  fi
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "[$tag] installing $torch_spec"
    "${pip[@]}" install "$torch_spec"
  fi
  constraints="$venv/torch-constraints.txt"
  "$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null \
    > "$constraints"
}
