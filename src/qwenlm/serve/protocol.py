"""The OpenAI request and response shapes: validation that names the bad field, and response bodies.

Unknown fields are ignored (clients send many optional ones); a known field of the wrong type or out of
range is a 400 whose body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from qwenlm.chat.session import ROLES

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered to the client with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param)


@dataclass
class Sampling:
    """The generation fields shared by both endpoints."""

    model: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: Sampling


@dataclass
class CompletionRequest:
    prompt: str | list[int]
    sampling: Sampling


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip


def _integer(data: dict[str, Any], name: str, minimum: int | None = None) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, f"{name} must be an integer, got {_type_name(value)} {json.dumps(value)}")
    if minimum is not None and value < minimum:
        raise bad(name, f"{name} must be >= {minimum}, got {value}")
    return value


def _number(data: dict[str, Any], name: str, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad(name, f"{name} must be a number, got {_type_name(value)} {json.dumps(value)}")
    return float(value)


def _boolean(data: dict[str, Any], name: str, default: bool = False) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {_type_name(value)} {json.dumps(value)}")
    return value


def _sampling(data: dict[str, Any]) -> Sampling:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model must be a string, got {_type_name(model)}")
    max_tokens = _integer(data, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens", 1)
    temperature = _number(data, "temperature", 1.0)
    if temperature < 0:
        raise bad("temperature", f"temperature must be >= 0 (0 = greedy), got {temperature}")
    top_p = _number(data, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad("top_p", f"top_p must be in (0, 1], got {top_p}")
    n = _integer(data, "n", 1)
    if n is not None and n != 1:
        raise bad("n", f"n must be 1 (one choice per request), got {n}")
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", f"stop must be a string or an array of strings, got {json.dumps(stop)[:80]}")
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise bad("stop", f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {json.dumps(stop)[:80]}")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", f"stream_options must be an object, got {_type_name(options)}")
    return Sampling(
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=_integer(data, "seed"),
        stop=tuple(stop),
        stream=_boolean(data, "stream"),
        include_usage=_boolean(options or {}, "include_usage"),
    )


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's array of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}]", f'{where}[{j}] must be a text part {{"type": "text", "text": ...}}')
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"{where} must be a string, got {_type_name(value)}")


def parse_chat(data: dict[str, Any]) -> ChatRequest:
    messages = data.get("messages")
    if messages is None:
        raise bad("messages", "messages is required: an array of {role, content} objects")
    if not isinstance(messages, list):
        raise bad("messages", f"messages must be an array, got {_type_name(messages)}")
    if not messages:
        raise bad("messages", "messages is empty: send at least one message")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role is {json.dumps(role)}; use one of {', '.join(ROLES)}")
        parsed.append({"role": role, "content": _content(m.get("content"), f"messages[{i}].content")})
    return ChatRequest(parsed, _sampling(data))


def parse_completion(data: dict[str, Any]) -> CompletionRequest:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return CompletionRequest(list(prompt), _sampling(data))
    if not isinstance(prompt, str):
        raise bad("prompt", f"prompt must be a string (or an array of token ids), got {json.dumps(prompt)[:80]}")
    if not prompt:
        raise bad("prompt", "prompt is empty")
    return CompletionRequest(prompt, _sampling(data))


# -- responses ----------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def chat_completion(rid: str, model: str, text: str, reason: str, prompt_tokens: int, completion_tokens: int):
    message = {"role": "assistant", "content": text}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, delta: dict[str, str], reason: str | None = None, usage_: dict | None = None):
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [] if usage_ else [choice]}  # fmt: skip
    if usage_:
        chunk["usage"] = usage_
    return chunk


def completion(rid: str, model: str, text: str, reason: str | None, usage_: dict | None = None, chunk: bool = False):
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [] if chunk and usage_ else [{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": reason}]}  # fmt: skip
    if usage_:
        body["usage"] = usage_
    return body
