"""qwenlm: Qwen (Qwen-7B v1 and the Qwen2 family) in small, plain PyTorch."""

from .config import QwenConfig
from .generation import GenerationConfig
from .model import QwenForCausalLM
from .tokenizer import QwenTokenizer

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "QwenConfig", "QwenForCausalLM", "QwenTokenizer", "__version__"]
