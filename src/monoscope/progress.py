"""Progress bars that show rate and ETA on a terminal and stay quiet in CI and logs."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    """On for an interactive terminal, off under CI or when MONOSCOPE_PROGRESS=0."""
    if os.environ.get("MONOSCOPE_PROGRESS") in ("0", "false"):
        return False
    if os.environ.get("CI"):
        return False
    return sys.stderr.isatty()


def progress_bar(total=None, enable: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar; ``enable=None`` decides from the environment."""
    enable = progress_enabled() if enable is None else enable
    return tqdm(total=total, disable=not enable, dynamic_ncols=True, unit_scale=True, **kwargs)
