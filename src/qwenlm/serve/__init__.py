"""An OpenAI-compatible HTTP server with continuous batching (``pip install "qwenlm[serve]"``).

``batch`` keeps the running rows in one KV cache, ``engine`` schedules requests on one worker thread,
``protocol`` validates OpenAI requests and shapes responses, ``app`` is the FastAPI app.
"""

from qwenlm.serve.engine import Engine, QueueFull, SamplingParams

__all__ = ["Engine", "QueueFull", "SamplingParams"]
