"""`glmtune serve`: an OpenAI-compatible HTTP API (chat completions, streamed or whole) over a ChatEngine.

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, and `GET /health` (no key
needed; for readiness checks). Errors use OpenAI's JSON shape, `{"error": {"message", "type", "param",
"code"}}`, so OpenAI clients raise their usual exceptions: 400 for a request that cannot be answered as
asked, 401 for a missing or wrong key, 503 when the queue is full, 500 when generation itself failed.
The request's `model` field is not checked: one server serves one model, whatever a client calls it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from glmtune.data.formats import Message
from glmtune.serve.engine import BadRequest, Busy, ChatEngine, ChatRequest, Failed, Finished

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as OpenAI's API


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_TextPart]
    name: str | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionBody(BaseModel):
    """The request body. Validated strictly from JSON: no numbers as strings, no strings as numbers.
    Fields OpenAI defines that this server does not implement are accepted only at their neutral value."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[_MessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None

    def to_request(self) -> ChatRequest:
        for name, neutral in (("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0), ("logprobs", False)):
            value = getattr(self, name)
            if value is not None and value != neutral:
                raise BadRequest(f"{name} {value!r} is not supported by this server (only {neutral!r})", name)
        if self.tools:
            raise BadRequest("tools are not supported by this server", "tools")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
        messages = []
        for m in self.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append(Message(m.role, content))
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise BadRequest("max_tokens and max_completion_tokens differ; send one of them", "max_tokens")
        return ChatRequest(messages=messages, max_tokens=self.max_tokens or self.max_completion_tokens,
                           temperature=self.temperature if self.temperature is not None else 0.0,
                           top_p=self.top_p if self.top_p is not None else 1.0, stop=stops, seed=self.seed)


def _error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _validation_message(error: ValidationError) -> tuple[str, str | None]:
    """The first problem as `messages[0].content: Input should be ...`; pydantic's union-member tags
    (`str`, `list[_TextPart]`) are left out of the field path."""
    first = error.errors(include_url=False)[0]
    where = ""
    for part in first["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool"):
            where += f".{part}" if where else part
    return (f"{where}: {first['msg']}" if where else first["msg"]), where or None


def create_app(engine: ChatEngine, model_name: str, api_key: str | None = None):
    created = int(time.time())
    app = FastAPI(title="glmtune", description=f"OpenAI-compatible API serving {model_name}", version="1")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return _error(401, "missing or wrong API key: send it as the header 'Authorization: Bearer KEY'",
                              code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error(400, str(exc.errors()[0].get("msg", exc)) if exc.errors() else "invalid request")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "glmtune"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "waiting": engine.waiting, "answered": engine.answered,
                "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            return _error(404, f"model {name!r} not found; this server serves {model_name!r}",
                          param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ChatCompletionBody.model_json_schema()}}}})
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = ChatCompletionBody.model_validate_json(raw)
            chat = body.to_request()
        except ValidationError as e:
            message, param = _validation_message(e)
            return _error(400, message, param=param)
        except BadRequest as e:
            return _error(400, str(e), param=e.param)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event) -> None:  # called from the engine's worker thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            job = await run_in_threadpool(engine.prepare, chat, deliver)
            engine.submit(job)
        except BadRequest as e:
            return _error(400, str(e), param=e.param)
        except Busy as e:
            return _error(503, str(e), kind="server_error", code="server_busy")

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        stamp = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, events, completion_id, stamp, model_name, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        pieces: list[str] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()  # nobody is waiting for the answer any more
                        return _error(499, "client went away")
                    continue
                if isinstance(event, str):
                    pieces.append(event)
                elif isinstance(event, Failed):
                    return _error(500, event.message, kind="server_error")
                else:
                    break
        finally:
            job.cancel()  # no effect once finished; frees the model if this handler was cancelled
        return {
            "id": completion_id, "object": "chat.completion", "created": stamp, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": event.finish_reason}],
            "usage": _usage(event),
        }

    return app


def _usage(finished: Finished) -> dict[str, int]:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


async def _sse(job, events: asyncio.Queue, completion_id: str, stamp: int, model_name: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. If the client goes away,
    the response is cancelled here and the job with it."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, usage=None, choices=True) -> str:
        data: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": stamp,
                                "model": model_name,
                                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}] if choices else []}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, str):
                yield chunk({"content": event})
            elif isinstance(event, Failed):
                error = {"error": {"message": event.message, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n"
                break
            else:
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield chunk({}, usage=_usage(event), choices=False)
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def serve(engine: ChatEngine, model_name: str, *, sock, api_key: str | None = None,
          log_level: str = "warning") -> None:
    """Runs the API on an already bound socket (glmtune.serve.network.listen) until Ctrl-C or SIGTERM."""
    import uvicorn

    app = create_app(engine, model_name, api_key)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
