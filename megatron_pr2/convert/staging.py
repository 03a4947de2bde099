"""Conversion output written into a staging folder and moved into place only when complete.

A conversion that fails or is interrupted removes its staging folder and leaves the output
path as it was (absent, or the empty folder it was); a killed one leaves only the staging folder
``<out>.partial-<pid>`` beside it. A rerun is never refused because of a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from megatron_pr2.convert.errors import ConversionError


def check_output_dir(out_dir: str) -> None:
    """``out_dir`` must be new or an empty folder."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"output {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and any(not n.startswith(".") for n in os.listdir(out_dir)):
        raise ConversionError(f"output directory {out_dir} is not empty; give a new or empty one")


@contextlib.contextmanager
def staged_output(out_dir: str) -> Iterator[str]:
    """Yield a new staging folder beside ``out_dir``; on success it becomes ``out_dir``.

    Raises:
        ConversionError: ``out_dir`` is not new or empty (before anything is written).
    """
    check_output_dir(out_dir)
    out_dir = os.path.abspath(out_dir)
    staging = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        check_output_dir(out_dir)  # nobody filled it meanwhile
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.exists(staging):
            raise ConversionError(f"the conversion failed and its staging folder {staging} "
                                  "could not be removed; delete it") from None
        raise
