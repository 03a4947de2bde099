"""The SGLang CPU venv the integration tests start servers from, and the mark that skips them
when it is absent."""

import os

import pytest

from megatron_pr2.rollout.sglang_server import DEFAULT_VENV, sglang_venv_ready

VENV = os.environ.get("MEGATRON_PR2_SGLANG_VENV", DEFAULT_VENV)
requires_sglang_venv = pytest.mark.skipif(
    not sglang_venv_ready(VENV),
    reason=f"SGLang venv absent at {VENV}: build it with `bash tools/sglang_env.sh` (about 4-5 min)",
)
