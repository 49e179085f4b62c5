"""The one way tests reach ``../shared`` (fixtures, the Qwen-7B vocabulary) and the demo model: skip with a reason
if absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QWENLM_SHARED", ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (the project's shared data folder sits beside the checkout)")
    return path


def fixtures(*parts: str) -> Path:
    return shared_path("fixtures", *parts)


def demo_model_or_skip() -> Path:
    """The demo GGUF (assembled from its PyPI parts on first use), or skip saying how to install it."""
    from qwenlm.demo import DemoNotInstalledError, demo_model_path

    try:
        return demo_model_path(progress_bar=False)
    except DemoNotInstalledError as e:
        pytest.skip(str(e))
