"""Generation settings: defaults from the checkpoint's ``generation_config.json``, overridden per call."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATION_CONFIG_FILE = "generation_config.json"
_UNSET: Any = object()


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_words_ids: list[list[int]] = field(default_factory=list)
    seed: int | None = None
    chat_format: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        return cls(**known, extra={k: v for k, v in raw.items() if k not in names})

    @classmethod
    def from_folder(cls, folder: str | Path) -> GenerationConfig:
        path = Path(folder, GENERATION_CONFIG_FILE)
        if not path.is_file():
            return cls()
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a valid generation config ({e})") from e

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with the given fields replaced; an explicit ``None`` replaces too (e.g. ``eos_token_id=None``
        means never stop at an end token)."""
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(
                f"unknown generation argument(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **overrides)

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
