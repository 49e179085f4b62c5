"""Generation: logits processors, sampling and the decode loop."""

from .config import GenerationConfig
from .generate import generate, stream_generate

__all__ = ["GenerationConfig", "generate", "stream_generate"]
