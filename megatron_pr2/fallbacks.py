"""Megatron-Core's Transformer Engine / Apex fallback, told once as an INFO line.

Without TE and Apex, several Megatron-Core modules each warn at import ("Transformer Engine and
Apex are not installed. Falling back to ...", "Apex is not installed. Falling back to Torch
Norm") and fall back to torch optimizers, local multi-tensor kernels and torch norms.
:func:`quiet_fallback_warnings` ignores exactly those warnings (nothing else of Megatron's);
:func:`log_fallback_implementation` says once which implementations are in use.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings

FALLBACK_WARNING = r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back"

logger = logging.getLogger(__name__)


def quiet_fallback_warnings() -> None:
    """Ignore Megatron-Core's TE/Apex fallback ``UserWarning``s (only those)."""
    warnings.filterwarnings("ignore", message=FALLBACK_WARNING, category=UserWarning)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def fallback_implementations() -> dict[str, str]:
    """Where Megatron-Core takes its kernels from, in its own order of preference: fused
    optimizers and multi-tensor ops (TE, else Apex, else torch/local), local-spec norms (Apex,
    else torch)."""
    optimizers = next((p for p in ("transformer_engine", "apex") if _installed(p)), "torch")
    return {"optimizers and multi-tensor ops": optimizers,
            "local-spec norms": "apex" if _installed("apex") else "torch"}


@functools.cache
def log_fallback_implementation() -> None:
    """Log once per process which implementations Megatron-Core uses."""
    used = ", ".join(f"{part} from {source}" for part, source in fallback_implementations().items())
    logger.info("Megatron-Core kernels: %s", used)
