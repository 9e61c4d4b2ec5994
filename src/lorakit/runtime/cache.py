"""lorakit's cache folder: the demo model, the advisor's timing calibration, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LORAKIT_CACHE, else ~/.cache/lorakit (not created here)."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")
