"""Math answer checking with Hugging Face ``math-verify`` (imported lazily)."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)


def _math_verify():
    try:
        import math_verify
    except ImportError as err:
        raise ImportError("math answer rewards need the `math-verify` package "
                          "(pip install math-verify)") from err
    return math_verify


def _timeout(seconds: int | None) -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set: off elsewhere."""
    return seconds if threading.current_thread() is threading.main_thread() else None


def parse_gold(answer: str, timeout_seconds: int | None = 5) -> list:
    """Parse a reference answer; bare LaTeX/expressions are read as ``$answer$``."""
    mv = _math_verify()
    timeout = _timeout(timeout_seconds)
    if "$" not in answer and "\\boxed" not in answer:
        parsed = mv.parse(f"${answer}$", parsing_timeout=timeout)
        if parsed:
            return parsed
    return mv.parse(answer, parsing_timeout=timeout)


def math_reward(response: str, answer: str, timeout_seconds: int | None = 5) -> float:
    """1.0 if the final answer in ``response`` (``\\boxed{}`` preferred) equals ``answer``
    mathematically (e.g. ``1/2`` == ``0.5`` == ``\\frac{1}{2}``), else 0.0.

    Args:
        response: the model's decoded response.
        answer: the reference answer (plain, LaTeX, or ``\\boxed{...}``).
        timeout_seconds: per parse/verify call; disabled outside the main thread.
    """
    mv = _math_verify()
    gold = parse_gold(answer, timeout_seconds)
    if not gold:
        logger.warning("math-verify could not parse the reference answer %r; reward 0", answer)
        return 0.0
    timeout = _timeout(timeout_seconds)
    predicted = mv.parse(response, parsing_timeout=timeout)
    return float(bool(predicted) and mv.verify(gold, predicted, timeout_seconds=timeout))
