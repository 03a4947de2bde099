"""One error path for every command-line entry point (trainer, compare, tools).

A fault the user can act on ends the command with one ``error: ...`` line per problem on
stderr and an exit status: 2 for bad input (flags, config, data, paths, servers checked before
anything is built), 1 for a fault at run time, 130 for Ctrl-C. No traceback is printed unless
asked for with ``--debug`` or ``MEGATRON_PR2_DEBUG=1``; an exception nobody anticipated is still
one line, naming its type and how to get the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MEGATRON_PR2_DEBUG"
EXIT_RUNTIME_FAULT = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among ``argv``, or ``MEGATRON_PR2_DEBUG`` set to a true value."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def problems_of(err: BaseException) -> list[str]:
    """The problems an exception names: its ``problems`` list, else its message (the first line
    of a message that spans several: an ``error:`` line stays one line)."""
    problems = getattr(err, "problems", None)
    if problems:
        return [str(p) for p in problems]
    lines = str(err).strip().splitlines() or [type(err).__name__]
    more = f" (and {len(lines) - 1} more lines: rerun with {DEBUG_FLAG})" if len(lines) > 1 else ""
    return [lines[0] + more]


def print_errors(problems: Sequence[str]) -> None:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr, flush=True)


def run_reporting(step: Callable[[], int | None], *, bad_input: tuple = (),
                  faults: tuple = (), debug: bool = False, speak: bool = True) -> int:
    """``step()``'s exit status (None counts as 0), or the status of the fault it raised.

    Args:
        step: the work; its exceptions are reported here, once.
        bad_input: exception types meaning the input is unusable (exit 2).
        faults: exception types of anticipated run-time faults (exit 1).
        debug: print the traceback too.
        speak: print the error lines (False on all but one process of a launch, so a fault every
            rank sees alike is reported once).
    """
    try:
        return step() or 0
    except KeyboardInterrupt as err:
        caught, lines, code = err, ["interrupted (Ctrl-C)"], EXIT_INTERRUPTED
    except bad_input as err:
        caught, lines, code = err, problems_of(err), EXIT_BAD_INPUT
    except faults as err:
        caught, lines, code = err, problems_of(err), EXIT_RUNTIME_FAULT
    except Exception as err:  # noqa: BLE001 -- the last line of defence: one line, not a dump
        hint = "" if debug else f"; rerun with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback"
        caught, lines = err, [f"unexpected {type(err).__name__}: {err}{hint}"]
        code = EXIT_RUNTIME_FAULT
    if debug:
        traceback.print_exception(caught)
    if speak:
        print_errors(lines)
    return code
