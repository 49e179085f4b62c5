"""Progress bars on stderr for the slow steps (dequantising, joining the demo model), when tqdm is installed."""

from __future__ import annotations

import sys
from typing import Any


class _Silent:
    """Stands in for a tqdm bar when progress is off or tqdm is not installed."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs: Any) -> Any:
    """A bar to ``update()`` by hand; ``close()`` it when done."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is optional: the work is the same without a bar
            return _Silent()
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, **kwargs)
    return _Silent()
