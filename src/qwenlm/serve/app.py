"""The HTTP face of the engine: an OpenAI-compatible FastAPI app, and ``run_server`` to start it.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream`` as server-sent events
ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. The event loop only parses, tokenizes
(in a thread) and relays; the model runs on the engine's worker thread. A request whose client
disconnects is cancelled at once, which frees its batch slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional extra
    raise ImportError(f'serving needs FastAPI and uvicorn ({e}): pip install "qwenlm[serve]"') from e

from qwenlm.chat.session import chat_stop_ids, messages_tokens
from qwenlm.serve.engine import Delta, Engine, Event, Failed, Finished, QueueFull, SamplingParams
from qwenlm.serve.protocol import (
    APIError,
    Sampling,
    bad,
    chat_chunk,
    chat_completion,
    completion,
    new_id,
    parse_chat,
    parse_completion,
    parse_json,
    usage,
)

try:
    from jinja2 import TemplateError
except ImportError:  # no jinja2: no template can be rendered (and none can raise)

    class TemplateError(Exception):
        pass


MAX_BODY_BYTES = 1 << 20
log = logging.getLogger("qwenlm.serve")


class EventStream(StreamingResponse):
    """Server-sent events that stop (and run the generator's ``finally``) as soon as the client leaves,
    not only when the next event fails to send."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away mid-send
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {int(declared):,} bytes; the limit is {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over the limit of {limit:,} bytes")
    return bytes(body)


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``work`` while watching for the client to leave: ``(True, result)``, or ``(False, None)`` if it left."""
    outcome: dict[str, Any] = {}

    async with anyio.create_task_group() as group:

        async def run() -> None:
            try:
                outcome["result"] = await work
            except Exception as e:  # re-raised below, outside the task group
                outcome["error"] = e
            group.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    if "error" in outcome:
        raise outcome["error"]
    return ("result" in outcome), outcome.get("result")


def create_app(
    engine: Engine,
    tokenizer,
    model_name: str,
    chat_template: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The app; it starts the engine's worker when it starts and stops it when it stops."""

    async def lifespan(app: FastAPI):
        if not engine.running:
            engine.start()
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="qwenlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")  # fmt: skip

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "qwenlm"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse_chat(parse_json(await _read_body(request, max_body_bytes)))
        try:
            prompt = await run_in_threadpool(messages_tokens, tokenizer, req.messages, chat_template)
        except ValueError as e:
            raise bad("messages", str(e)) from None
        except TemplateError as e:  # e.g. the template's raise_exception("roles must alternate")
            raise bad("messages", f"the model's chat template refused these messages: {e}") from None
        return await generate(request, prompt, req.sampling, "messages", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse_completion(parse_json(await _read_body(request, max_body_bytes)))
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = await run_in_threadpool(tokenizer.encode, prompt)
        elif max(prompt) >= len(tokenizer) or min(prompt) < 0:
            raise bad("prompt", f"prompt token ids must be in 0..{len(tokenizer) - 1}")
        return await generate(request, prompt, req.sampling, "prompt", chat=False)

    async def generate(request: Request, prompt: list[int], s: Sampling, field: str, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        params = SamplingParams(s.max_tokens or engine.context, s.temperature, s.top_p, s.seed, s.stop)
        try:
            job = engine.submit(prompt, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            busy = f"the server is busy: {e}"
            raise APIError(429, busy, type="rate_limit_error", code="rate_limit_exceeded") from None
        except ValueError as e:
            raise bad(field, str(e)) from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        model = model_name  # whatever the client asked for, this is the model that answers
        if s.stream:
            stream = _chat_events if chat else _completion_events
            return EventStream(_cancel_after(stream(events, rid, model, s.include_usage), lambda: engine.cancel(job)))
        try:
            answered, result = await _unless_disconnected(request, _collect(events))
        finally:
            engine.cancel(job)  # no-op when finished; frees the slot when the client left
        if not answered:
            return Response(status_code=499)  # nobody is listening
        text, end = result
        if chat:
            return JSONResponse(chat_completion(rid, model, text, end.reason, end.prompt_tokens, end.completion_tokens))
        return JSONResponse(completion(rid, model, text, end.reason, usage(end.prompt_tokens, end.completion_tokens)))

    return app


async def _collect(events: asyncio.Queue[Event]) -> tuple[str, Finished]:
    parts = []
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return "".join(parts), event
        else:
            raise APIError(500, event.message, type="server_error")


async def _cancel_after(stream: AsyncIterator[str], cancel: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for item in stream:
            yield item
    finally:
        cancel()


async def _chat_events(events: asyncio.Queue[Event], rid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}))
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            yield sse(chat_chunk(rid, model, {"content": event.text}))
            continue
        if isinstance(event, Finished):
            yield sse(chat_chunk(rid, model, {}, event.reason))
            if include_usage:
                yield sse(chat_chunk(rid, model, {}, usage_=usage(event.prompt_tokens, event.completion_tokens)))
        elif isinstance(event, Failed):
            yield sse(APIError(500, event.message, type="server_error").body())
        yield "data: [DONE]\n\n"
        return


async def _completion_events(
    events: asyncio.Queue[Event], rid: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            yield sse(completion(rid, model, event.text, None))
            continue
        if isinstance(event, Finished):
            yield sse(completion(rid, model, "", event.reason))
            if include_usage:
                yield sse(completion(rid, model, "", None, usage(event.prompt_tokens, event.completion_tokens), True))
        elif isinstance(event, Failed):
            yield sse(APIError(500, event.message, type="server_error").body())
        yield "data: [DONE]\n\n"
        return


def run_server(
    model,
    tokenizer,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    log_level: str = "warning",
) -> None:
    """Serve a loaded model and tokenizer until interrupted (the tokenizer's chat template, if any, renders
    chat requests; ChatML otherwise)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f'serving needs FastAPI and uvicorn ({e}): pip install "qwenlm[serve]"') from e

    eos = model.generation_config.eos_ids if model.generation_config else []
    engine = Engine(model, tokenizer, chat_stop_ids(tokenizer, eos), max_batch=max_batch, max_queue=max_queue)
    template = getattr(tokenizer, "chat_template", None)
    app = create_app(engine, tokenizer, model_name, template, api_key)
    print(f"qwenlm: serving {model_name} ({'its chat template' if template else 'ChatML'}) on http://{host}:{port}, "
          f"up to {max_batch} requests per batch{'; API key required' if api_key else ''}",
          file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
