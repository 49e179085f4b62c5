"""The folder where qwenlm keeps what it makes once and reuses: the joined demo model, compiled programs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QWENLM_CACHE`` if set, else ``~/.cache/qwenlm``."""
    return Path(os.environ.get("QWENLM_CACHE") or Path.home() / ".cache" / "qwenlm")
