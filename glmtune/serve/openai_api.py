"""`glmtune serve`: an OpenAI-compatible HTTP API (chat completions, streamed or whole) over a ChatEngine.

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, and `GET /health` (no key
needed; for readiness checks). Errors use OpenAI's JSON shape, `{"error": {"message", "type", "param",
"code"}}`, so OpenAI clients raise their usual exceptions: 400 for a request that cannot be answered as
asked, 401 for a missing or wrong key, 404 for a model this server does not serve, 503 when the queue is
full, 500 when generation itself failed.

Models: a server of one model answers whatever a client calls it (the `model` field is not checked). A server
of several adapters over one base (`glmtune serve --adapter NAME=DIR ...`) lists them all, the base included,
in `GET /v1/models`; the request's `model` picks one, and a name it does not serve is a 404.

Tools (ChatGLM3 and GLM-4 models): `tools` and `tool_choice` ("auto", "none", "required" with one tool, or a
named function) as OpenAI's API takes them; a call in the answer comes back as the message's `tool_calls` with
finish_reason "tool_calls" (streamed as one delta once the call is complete), and the next request carries the
assistant message with its `tool_calls` and a `tool` message per result. Other models answer 400 to tools.

Every request passes a guard first (pure ASGI, see _Guard): the `Host` header must name this server
(DNS rebinding), a browser's `Origin` must be this server or one given with `--allow-origin` (no CORS
headers otherwise), the key must match on every route but /health, a POST must be JSON (a web page cannot
send JSON to another site without the server's consent), and a body may not exceed `--max-body-bytes`
nor take longer than `--read-timeout` to arrive.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from glmtune.config import GenerationOptions
from glmtune.data.formats import Message
from glmtune.data.messages import read_turn
from glmtune.errors import GlmtuneError
from glmtune.serve.engine import ROLES, BadRequest, Busy, ChatEngine, ChatRequest, Failed, Finished, ToolCalled
from glmtune.serve.network import AllowedHosts, host_name

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as OpenAI's API
# A conversation that fills a 128k-token context is about 0.5 MB of English or 1.2 MB of Chinese as JSON
# (escaped as \uXXXX); 4 MiB leaves room for that and refuses what no context could hold.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 30.0  # seconds for a request's head, and again for its body, to arrive
# A function name as OpenAI's API allows it (letters, digits, _ and -, at most 64), and dots: one word on the
# metadata line of ChatGLM3's and GLM-4's call format.
TOOL_NAME = re.compile(r"[\w.-]{1,64}")


class _Strict(BaseModel):
    # Unknown fields are refused, as by OpenAI: a field this server ignored would change nothing silently.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _MessageIn(_Strict):
    role: str
    content: str | list[_TextPart] | None = None  # None only in an assistant message with tool_calls
    name: str | None = None
    tool_calls: list[Any] | None = None  # an assistant's calls, as this server answered them (read by read_turn)
    tool_call_id: str | None = None  # a tool message's: the call it answers
    # What an OpenAI client sends back with an earlier answer; accepted only empty.
    refusal: str | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None


class _StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


# OpenAI fields this server does not implement, each accepted only at a value that changes nothing here.
NEUTRAL: dict[str, tuple] = {
    "n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "response_format": ({"type": "text"},), "functions": ([],), "function_call": ("none",),
    "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (), "verbosity": (),
    "web_search_options": (),
}
MESSAGE_NEUTRAL: dict[str, tuple] = {"name": (), "refusal": (), "function_call": (), "audio": (), "annotations": ([],)}


class ChatCompletionBody(_Strict):
    """The request body. Validated strictly from JSON: no numbers as strings, no strings as numbers, no
    unknown fields. Fields OpenAI defines that this server does not implement are accepted only at their
    neutral value (NEUTRAL); bookkeeping fields that do not change an answer (user, metadata, store,
    service_tier, prompt_cache_key, safety_identifier) are accepted and not used."""

    model: str | None = None
    messages: list[_MessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # ChatGLM3 and GLM-4 call one tool per answer (rarely more) anyway
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def to_request(self, defaults: GenerationOptions) -> ChatRequest:
        """The engine's request: the fields given over `defaults` (the engine's options)."""
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and value not in neutral:
                allowed = f" (only {' or '.join(json.dumps(v) for v in neutral)})" if neutral else ""
                raise BadRequest(f"{name} {json.dumps(value)[:80]} is not supported by this server{allowed}", name)
        options = self.stream_options
        if options is not None and options.include_obfuscation:
            raise BadRequest("stream_options.include_obfuscation is not supported by this server",
                             "stream_options.include_obfuscation")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
        messages = self._messages()
        tools, force = self._tools()
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise BadRequest("max_tokens and max_completion_tokens differ; send one of them", "max_tokens")
        length = self.max_tokens or self.max_completion_tokens  # the wire's two names for max_new_tokens
        given = {"max_new_tokens": length, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        generation = replace(defaults, **{k: v for k, v in given.items() if v is not None})
        # without max_tokens the answer gets the engine's length, cut to what the context has left
        return ChatRequest(messages, generation, stop=stops, fit_context=length is None, tools=tools,
                           force_tool=force, model=self.model)

    def _messages(self) -> list[Message]:
        """The conversation. One with tool calls or results is read as training data is (read_turn): calls
        followed by their results, in order, so that a misplaced one is a 400 naming it."""
        with_tools = any(m.role == "tool" or m.tool_calls for m in self.messages)
        messages: list[Message] = []
        for i, m in enumerate(self.messages):
            where = f"messages[{i}]"
            for name, neutral in MESSAGE_NEUTRAL.items():
                if getattr(m, name) is not None and getattr(m, name) not in neutral:
                    raise BadRequest(f"{where}.{name} is not supported by this server", f"{where}.{name}")
            if m.role not in ROLES:
                raise BadRequest(f"{where}.role is {m.role!r}; this server takes {', '.join(ROLES)}", f"{where}.role")
            if m.tool_calls and m.role != "assistant":
                raise BadRequest(f"{where}.tool_calls: only an assistant message calls tools", f"{where}.tool_calls")
            if m.tool_call_id is not None and m.role != "tool":
                raise BadRequest(f"{where}.tool_call_id belongs to tool messages only", f"{where}.tool_call_id")
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text for p in content)
            if content is None and not (m.role == "assistant" and m.tool_calls):
                raise BadRequest(f"{where}.content is missing (only an assistant message with tool_calls may leave "
                                 "it out)", f"{where}.content")
            if not with_tools:
                messages.append(Message(m.role, content))
                continue
            turn: dict[str, Any] = {"role": m.role, "content": content}
            if m.tool_calls:
                turn["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                turn["tool_call_id"] = m.tool_call_id
            try:
                read_turn(messages, turn, where)
            except GlmtuneError as e:
                raise BadRequest(str(e), where) from None
        return messages

    def _tools(self) -> tuple[list[dict] | None, str | None]:
        """The tools to write into the prompt (None: none, the answer is text) and the one it must call, if any."""
        tools = self.tools or None
        names = _check_tools(tools) if tools else []
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if choice.get("type") != "function" or not isinstance(name, str) or set(choice) - {"type", "function"}:
                raise BadRequest('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                                 f'{{"name": NAME}}}}, got {json.dumps(choice)[:80]}', "tool_choice")
        elif choice not in ("auto", "none", "required"):
            raise BadRequest(f'tool_choice must be "auto", "none", "required" or {{"type": "function", "function": '
                             f'{{"name": NAME}}}}, got {json.dumps(choice)[:80]}', "tool_choice")
        else:
            name = None
        if choice == "none":
            return None, None  # the tools stay out of the prompt: the model answers in text
        if not tools:
            raise BadRequest(f"tool_choice {json.dumps(choice)[:80]} needs tools: give the functions the model may "
                             "call", "tool_choice")
        if choice == "required":
            if len(names) != 1:
                raise BadRequest(f'tool_choice "required" works here with one tool only (this server makes the model '
                                 f'call it); with {len(names)}, name the one to call: {{"type": "function", '
                                 '"function": {"name": NAME}}', "tool_choice")
            name = names[0]
        if name is not None and name not in names:
            raise BadRequest(f"tool_choice names function {name[:80]!r}, which is not in tools ({', '.join(names)})",
                             "tool_choice")
        return tools, name


def _check_tools(tools: list[Any]) -> list[str]:
    """The function names of OpenAI-shaped `tools`; a 400 naming the first entry that is not one."""
    names: list[str] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise BadRequest(f'{where} must be {{"type": "function", "function": {{"name": ..., "description": ..., '
                             f'"parameters": {{...}}}}}} (the only kind of tool here), got {json.dumps(tool)[:80]}',
                             where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise BadRequest(f"{where}.function.name must be 1 to 64 letters, digits, underscores, dots or dashes, got "
                             f"{json.dumps(name, ensure_ascii=False)[:80]}", f"{where}.function.name")
        if name in names:
            raise BadRequest(f"{where}.function.name {name!r} is given twice", f"{where}.function.name")
        for key, kind, label in (("description", str, "a string"), ("parameters", dict, "a JSON schema object")):
            if function.get(key) is not None and not isinstance(function[key], kind):
                raise BadRequest(f"{where}.function.{key} must be {label}", f"{where}.function.{key}")
        names.append(name)
    return names


def _error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _validation_message(error: ValidationError) -> tuple[str, str | None]:
    """The most specific problem as `messages[0].content: Input should be ...` (of a union, the member that
    got furthest); pydantic's union-member tags (`str`, `list[_TextPart]`) are left out of the field path."""
    first = max(error.errors(include_url=False), key=lambda e: len(e["loc"]))  # the first of the deepest
    where = ""
    for part in first["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool"):
            where += f".{part}" if where else part
    message = "unrecognized parameter" if first["type"] == "extra_forbidden" else first["msg"]
    return (f"{where}: {message}" if where else message), where or None


class _Refused(Exception):
    """A request refused while its body was read (413, 408)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


class _ClientGone(Exception):
    pass


async def _read_body(receive, limit: int, timeout: float) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes and (408) if it has not all arrived
    within `timeout` seconds: a slow or endless upload cannot hold a connection and its memory."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            raise _Refused(408, f"the request body did not arrive within {timeout:g} s", "request_timeout") from None
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise _Refused(413, f"the request body is larger than this server's limit of {limit} bytes "
                                "(glmtune serve --max-body-bytes)", "request_too_large")
        if not message.get("more_body", False):
            return bytes(body)


class _Guard:
    """Pure ASGI middleware that checks a request before any route sees it. (Starlette's BaseHTTPMiddleware,
    which @app.middleware("http") builds, would keep the route from noticing that its client went away.)"""

    def __init__(self, app, *, hosts: AllowedHosts | None, origins: tuple[str, ...], api_key: str | None,
                 max_body_bytes: int, cors: bool):
        self.app, self.hosts, self.origins, self.max_body_bytes, self.cors = app, hosts, origins, max_body_bytes, cors
        self.key = api_key.encode() if api_key else None

    def problem(self, scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if self.hosts is not None and not self.hosts.allows(host):
            return _error(400, f"this server does not answer for host {host_name(host or '')!r}; start it with "
                               f"--allowed-host NAME to allow a name", code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            return _error(403, f"requests from web pages at {origin[:100]!r} are not allowed; start the server with "
                               f"--allow-origin ORIGIN to allow them", code="origin_not_allowed")
        if scope["method"] == "OPTIONS" and self.cors:
            return None  # a CORS preflight: never carries the key; CORSMiddleware answers it
        if self.key is not None and scope["path"] != "/health":
            header = headers.get("authorization", "").encode("latin-1")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                return _error(401, "missing or wrong API key: send it as the header 'Authorization: Bearer KEY'",
                              code="invalid_api_key")
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return _error(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                                   f"(got {media[:60] or 'none'!r})", code="unsupported_media_type")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                return _error(413, f"the request body ({int(length)} bytes) is larger than this server's limit of "
                                   f"{self.max_body_bytes} bytes (glmtune serve --max-body-bytes)",
                              code="request_too_large")
        return None

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        # the page is this server's own (e.g. /docs): its origin names the host the request was sent to
        scheme, _, rest = origin.partition("://")
        return scheme in ("http", "https") and host is not None and rest.lower() == host.strip().lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refused = self.problem(scope)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: ChatEngine, model_name: str, api_key: str | None = None, *,
               hosts: AllowedHosts | None = None, allow_origins: tuple[str, ...] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout: float = DEFAULT_READ_TIMEOUT):
    """The API as an ASGI app. `hosts`: the Host values answered (None: any; serve() always gives them)."""
    created = int(time.time())
    app = FastAPI(title="glmtune", description=f"OpenAI-compatible API serving {model_name}", version="1")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return _error(400, str(first.get("msg", "invalid request")), param=where)

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # logged by Starlette; the client gets OpenAI's shape, not plain text
        return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    several = len(engine.model_names) > 1
    names = [str(name) for name in engine.model_names] if several else [model_name]

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "glmtune"}

    def not_served(name: str) -> JSONResponse:
        return _error(404, f"model {name!r} not found; this server serves {', '.join(repr(n) for n in names)}",
                      param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "models": names, "waiting": engine.waiting,
                "running": engine.running, "answered": engine.answered, "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in names:
            return not_served(name)
        return model_card(name)

    @app.post("/v1/chat/completions",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ChatCompletionBody.model_json_schema()}}}})
    async def chat_completions(request: Request):
        try:
            raw = await _read_body(request.receive, max_body_bytes, read_timeout)
        except _Refused as e:
            return _error(e.status, str(e), code=e.code)
        except _ClientGone:
            return _error(499, "client went away")
        try:
            body = ChatCompletionBody.model_validate_json(raw)
            chat = body.to_request(engine.generation)
        except ValidationError as e:
            message, param = _validation_message(e)
            return _error(400, message, param=param)
        except BadRequest as e:
            return _error(400, str(e), param=e.param)
        if several and chat.model is not None and chat.model not in names:  # before the prompt is built
            return not_served(chat.model)
        answered_by = chat.model if several and chat.model is not None else names[0]

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event) -> None:  # called from the engine's worker thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:  # tokenizing runs in the thread pool, beside other requests' (the engine locks nothing)
            job = await run_in_threadpool(engine.prepare, chat, deliver)
            engine.submit(job)
        except BadRequest as e:
            return _error(400, str(e), param=e.param)
        except Busy as e:
            return _error(503, str(e), kind="server_error", code="server_busy")

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        stamp = int(time.time())
        if body.stream:  # StreamingResponse notices a client that goes away, and _sse cancels the job
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, events, completion_id, stamp, answered_by, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        # A whole answer: watch the connection meanwhile, and cancel the job the moment the client is gone,
        # whether it still waits in the queue or is being generated.
        gone = object()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()
            events.put_nowait(gone)

        watcher = asyncio.create_task(watch())
        pieces: list[str] = []
        calls: list[dict[str, Any]] = []
        try:
            while True:
                event = await events.get()
                if event is gone:
                    return _error(499, "client went away")
                if isinstance(event, str):
                    pieces.append(event)
                elif isinstance(event, ToolCalled):
                    calls.append(_tool_call(event))
                elif isinstance(event, Failed):
                    return _error(500, event.message, kind="server_error")
                else:
                    break
        finally:
            watcher.cancel()
            job.cancel()  # no effect once finished; frees the model if this handler was cancelled
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces) or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return {
            "id": completion_id, "object": "chat.completion", "created": stamp, "model": answered_by,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": event.finish_reason}],
            "usage": _usage(event),
        }

    guarded = _Guard(app, hosts=hosts, origins=tuple(allow_origins), api_key=api_key,
                     max_body_bytes=max_body_bytes, cors=bool(allow_origins))
    if not allow_origins:
        return guarded
    from starlette.middleware.cors import CORSMiddleware

    # Outside the guard: a preflight gets its answer, and the guard's refusals carry the CORS headers too.
    return CORSMiddleware(guarded, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                          allow_headers=["authorization", "content-type"])


def _tool_call(event: ToolCalled) -> dict[str, Any]:
    """A call as OpenAI writes it: the arguments as a JSON string."""
    call = event.call
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


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
            elif isinstance(event, ToolCalled):  # whole: the engine holds a call back until it is complete
                yield chunk({"tool_calls": [{"index": event.index, **_tool_call(event)}]})
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


def _protocol(head_timeout: float):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's head (request line and headers):
    uvicorn closes idle keep-alive connections, but waits forever for a client that sends half a head and
    stops. Malformed requests get OpenAI's error shape too."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _watch_head(self) -> None:
            if not self._between_requests():
                self._stop_head_timer()
            elif self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(head_timeout, self._head_late)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self._between_requests():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": {"message": "invalid HTTP request", "type": "invalid_request_error",
                                         "param": None, "code": None}}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


def make_server(engine: ChatEngine, model_name: str, *, api_key: str | None = None,
                hosts: AllowedHosts | None = None, allow_origins: tuple[str, ...] = (),
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout: float = DEFAULT_READ_TIMEOUT,
                log_level: str = "warning"):
    """A uvicorn.Server for the API (not started); see create_app for the options."""
    import uvicorn

    app = create_app(engine, model_name, api_key, hosts=hosts, allow_origins=allow_origins,
                     max_body_bytes=max_body_bytes, read_timeout=read_timeout)
    config = uvicorn.Config(app, http=_protocol(read_timeout), log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(engine: ChatEngine, model_name: str, *, sock, **options) -> None:
    """Runs the API on an already bound socket (glmtune.serve.network.listen) until Ctrl-C or SIGTERM;
    `options` as make_server's."""
    server = make_server(engine, model_name, **options)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
