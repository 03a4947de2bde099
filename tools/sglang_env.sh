#!/usr/bin/env bash
# Build SGLang's own virtual environment for running it on CPU (docs/platform.md).
#
# SGLang pins a torch and transformers that differ from the trainer's, so it lives in a separate
# venv and runs as a separate process (started by tools/launch_sglang.py). What works on CPU:
# the CPU torch wheel held by a constraints file, sglang and triton installed with --no-deps plus
# the light dependencies below, and import stubs for torchvision and sgl_kernel. The stubs are
# written to $VENV/cpu-stubs, which is NOT on sys.path: the launcher appends it only after
# transformers has probed for torchvision (so transformers keeps treating torchvision as absent).
# Idempotent; writes $VENV/sglang-cpu-ready when complete.
#   VENV=path    where to build it (default: .venv-sglang in the repository)
#   TORCH_SPEC   torch to install (default: torch==2.13.0, the CPU wheel)
#   PYTHON       interpreter for the venv (default: python3.11)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv-sglang}"
# shellcheck source=tools/torch_venv.sh
source "$repo/tools/torch_venv.sh"
sglang_spec="sglang==0.5.23"
triton_spec="triton==3.9.0"
light_deps=(
  numpy transformers==5.19.0 aiohttp fastapi uvicorn uvloop orjson pydantic pyzmq psutil requests
  setproctitle msgspec pybase64 python-multipart prometheus-client packaging tqdm einops
  partial_json_parser xxhash zstandard safetensors sentencepiece interegular regex pillow scipy
  ipython openai dill apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 gguf jsonschema xgrammar
  soundfile
)
start=$(date +%s)
marker="$venv/sglang-cpu-ready"
rm -f "$marker"

torch_venv "$venv" sglang-env
echo "[sglang-env] installing SGLang's light dependencies (holding $(cat "$constraints"))"
"${pip[@]}" install -c "$constraints" "${light_deps[@]}"
echo "[sglang-env] installing $sglang_spec and $triton_spec without their dependencies"
"${pip[@]}" install --no-deps "$sglang_spec" "$triton_spec"

# Import stubs: every attribute and submodule exists so module-level imports succeed; using one
# raises NotImplementedError naming it. Written outside sys.path (see the header).
stubs="$venv/cpu-stubs"
for pkg in torchvision sgl_kernel; do
  mkdir -p "$stubs/$pkg"
  sed "s/@PKG@/$pkg/g" > "$stubs/$pkg/__init__.py" <<'EOF'
"""Import-time stub of @PKG@ for SGLang on CPU (written by tools/sglang_env.sh)."""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+cpustub"


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(cls.__qualname__ + "." + name)

    def __call__(cls, *args, **kwargs):
        raise NotImplementedError(cls.__qualname__ + " is a CPU import stub and cannot be used")


def _placeholder(qualname):
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(self.__name__ + "." + name)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("@PKG@."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_StubFinder())
__path__ = []
sys.modules[__name__].__class__ = _StubModule
EOF
done

echo "[sglang-env] checking the import of sglang's server entry point"
"$venv/bin/python" "$repo/tools/launch_sglang.py" --check-imports
versions=$("$venv/bin/python" -c "import importlib.metadata as m; print(' '.join(p + '==' + m.version(p) for p in ('sglang', 'torch', 'transformers', 'triton')))")
echo "$versions" > "$marker"
echo "[sglang-env] ready: $venv ($versions) in $(( $(date +%s) - start )) s"
