"""`glmtune serve` against hostile clients (issue 17): the API server in this process (uvicorn in a thread,
on a free loopback port) over the tiny random model, driven with raw HTTP. Every refusal is OpenAI-shaped,
and the server goes on serving."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from glmtune.serve.engine import ChatEngine  # noqa: E402
from glmtune.serve.network import allowed_hosts  # noqa: E402

KEY = "hostile-test-key"
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    # one sequence at a time, so that a second request waits in the queue
    engine = ChatEngine(Generator(load_model(str(tiny_model_dir))), generation=GenerationOptions(max_new_tokens=4),
                        max_batch=1)
    engine.start()
    yield engine
    engine.close()


def running(engine, **options):
    """The API on a free loopback port for the with-block; yields its base URL."""
    from conftest import api_in_thread

    return api_in_thread(engine, api_key=KEY, **options)


@pytest.fixture(scope="module")
def server(engine):
    with running(engine, read_timeout=1.0, max_body_bytes=100_000) as base:
        yield base


def post(base, body, *, key=KEY, timeout=30, **headers):
    headers = {"Authorization": f"Bearer {key}", **headers}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def openai_error(response, status, code=None, param=None):
    """The response is `status` in OpenAI's error shape (and carries `code` / `param` when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def still_serving(base):
    reply = post(base, HI)
    assert reply.status_code == 200, reply.text
    return reply.json()


def raw(base, data: bytes) -> socket.socket:
    """A socket to the server that has sent `data` (and may send more)."""
    host, port = base.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(data)
    return conn


def head(path="/v1/chat/completions", length=None, extra="") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}",
             "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def read_reply(conn: socket.socket, timeout: float) -> bytes:
    conn.settimeout(timeout)
    data = b""
    with contextlib.suppress(socket.timeout, ConnectionResetError):
        while chunk := conn.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.endswith(b"}"):
                break
    return data


# -- abandoned requests -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def slow_generation(engine, seconds_per_token: float = 0.05):
    """Generation at a known, slow pace that never ends early (no end-of-turn token before max_tokens);
    `started` is set once the first token is being generated."""
    import torch

    model = engine.generator.loaded.model
    real = model.forward
    stops = sorted(engine.generator.stop_ids)
    started = threading.Event()

    def forward(*args, **kwargs):
        started.set()
        time.sleep(seconds_per_token)
        output = real(*args, **kwargs)
        output.logits[..., stops] = torch.finfo(output.logits.dtype).min
        return output

    model.forward = forward
    try:
        yield started
    finally:
        del model.forward


def counts(base) -> tuple[int, int]:
    health = httpx.get(base + "/health", timeout=10).json()
    return health["answered"], health["cancelled"]


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_dropped_whole_answer_is_cancelled_while_generating_and_while_queued(server, engine):
    """Two non-streamed requests of 400 tokens (20 s each at this pace): one generating, one queued. Both
    clients hang up; both jobs are cancelled at once and the next request is answered promptly."""
    body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400}).encode()
    answered, cancelled = counts(server)
    with slow_generation(engine) as started:
        first = raw(server, head(length=len(body)) + body)
        assert started.wait(20)
        second = raw(server, head(length=len(body)) + body)
        assert wait_for(lambda: engine.waiting == 1)
        second.close()  # hangs up while queued
        first.close()  # hangs up while its answer is generated
        assert wait_for(lambda: counts(server)[1] == cancelled + 2, 5), counts(server)
        began = time.monotonic()
        assert still_serving(server)["choices"][0]["finish_reason"] in ("stop", "length")
        assert time.monotonic() - began < 5
    assert counts(server)[0] == answered + 1


# -- request bodies ---------------------------------------------------------------------------------------------

def test_an_oversize_body_is_refused_413_before_it_is_sent(server):
    conn = raw(server, head(length=50_000_000))  # announces 50 MB, sends none of it
    with conn:
        reply = read_reply(conn, 5)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    still_serving(server)


def test_a_chunked_body_is_refused_413_once_it_passes_the_limit(server):
    conn = raw(server, head(extra="Transfer-Encoding: chunked\r\n"))
    with conn:
        piece = b"x" * 30_000
        with contextlib.suppress(OSError):
            for _ in range(10):  # 300 kB in all, limit 100 kB
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        reply = read_reply(conn, 5)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    openai_error(post(server, {**HI, "messages": [{"role": "user", "content": "x" * 120_000}]}), 413,
                 code="request_too_large")
    still_serving(server)


def test_one_clients_long_tokenizing_holds_up_no_other_client(server, engine):
    """A prompt whose tokenizing takes as long as the test wants (it waits for `release`): meanwhile another
    client is answered."""
    encoder = engine.generator.encoder
    real = encoder._tokens
    release, tokenizing = threading.Event(), threading.Event()

    def tokens(text):
        if "SLOW-PROMPT" in text:
            tokenizing.set()
            release.wait(30)
        return real(text)

    encoder._tokens = tokens
    try:
        slow = threading.Thread(target=post, args=(server, {**HI, "messages": [{"role": "user",
                                                                                 "content": "SLOW-PROMPT"}]}))
        slow.start()
        assert tokenizing.wait(10)
        began = time.monotonic()
        still_serving(server)
        assert time.monotonic() - began < 5
        assert slow.is_alive()  # still tokenizing
    finally:
        release.set()
        encoder._tokens = real
    slow.join(30)


def test_a_body_sent_too_slowly_gets_408_and_a_half_sent_head_is_closed(server):
    conn = raw(server, head(length=100) + b'{"messages": [')  # then nothing more
    with conn:
        began = time.monotonic()
        reply = read_reply(conn, 10)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - began < 5
    conn = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # head never finished
    with conn:
        conn.settimeout(10)
        began = time.monotonic()
        assert conn.recv(100) == b""  # closed by the server
    assert time.monotonic() - began < 5
    still_serving(server)


def test_broken_http_gets_an_openai_shaped_400(server):
    with raw(server, b"GARBAGE / HTTP/1.1\r\nHost\r\n\r\n") as conn:
        reply = read_reply(conn, 5)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


# -- browsers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_only_json_bodies_are_read_so_a_web_form_cannot_post(server, content_type):
    headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": content_type} if content_type else {})
    response = httpx.post(server + "/v1/chat/completions", content=json.dumps(HI).encode(), headers=headers)
    openai_error(response, 415, code="unsupported_media_type")
    assert post(server, HI, **{"Content-Type": "application/json; charset=utf-8"}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "10.0.0.1"])
def test_a_host_that_is_not_this_servers_is_refused_against_dns_rebinding(server, host):
    for path, send in (("/v1/models", httpx.get), ("/health", httpx.get)):
        response = send(server + path, headers={"Host": host, "Authorization": f"Bearer {KEY}"})
        openai_error(response, 400, code="invalid_host")
    response = post(server, HI, Host=host)
    openai_error(response, 400, code="invalid_host")
    assert "--allowed-host" in response.json()["error"]["message"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST.", "[::1]", "localhost:1234"])
def test_the_loopback_names_are_answered(server, host):
    assert post(server, HI, Host=host).status_code == 200


def test_allowed_hosts_follow_the_bound_address():
    loopback, anywhere = allowed_hosts("127.0.0.1"), allowed_hosts("0.0.0.0")
    assert loopback.allows("localhost:8000") and loopback.allows("[::1]:8000") and not loopback.allows("192.168.1.5")
    assert anywhere.allows("192.168.1.5:8000") and anywhere.allows("[fe80::1]") and not anywhere.allows("evil.example")
    named = allowed_hosts("127.0.0.1", ["api.example.org"])
    assert named.allows("API.example.org:443") and not named.allows("example.org")
    assert allowed_hosts("127.0.0.1", ["*"]).allows("anything.example")
    own = allowed_hosts("192.168.1.5")
    assert own.allows("192.168.1.5:8000") and not own.allows("localhost")


def test_web_pages_of_other_origins_are_refused_and_get_no_cors_headers(server):
    response = post(server, HI, Origin="https://evil.example")
    openai_error(response, 403, code="origin_not_allowed")
    assert not any(h.startswith("access-control-") for h in response.headers)
    preflight = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code >= 400 and "access-control-allow-origin" not in preflight.headers
    same = post(server, HI, Origin=server)  # a page of this server (/docs)
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers


def test_allow_origin_answers_preflights_and_adds_cors_headers_for_that_origin_only(engine):
    page = "http://localhost:3000"
    with running(engine, allow_origins=(page,)) as base:
        preflight = httpx.options(base + "/v1/chat/completions", headers={
            "Origin": page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == page
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        reply = post(base, HI, Origin=page)
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == page
        refused = post(base, HI, key="wrong", Origin=page)  # the page can read why it was refused
        openai_error(refused, 401) and refused.headers["access-control-allow-origin"] == page
        openai_error(post(base, HI, Origin="http://localhost:3001"), 403, code="origin_not_allowed")


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/v1/models", "/nowhere"])
def test_every_route_but_health_needs_the_key(server, path):
    openai_error(httpx.get(server + path), 401, code="invalid_api_key")
    assert httpx.get(server + path, headers={"Authorization": f"Bearer {KEY}"}).status_code in (200, 404)
    assert httpx.get(server + "/health").status_code == 200


def test_a_key_header_with_bytes_beyond_ascii_is_a_401_not_a_crash(server):
    response = httpx.post(server + "/v1/chat/completions", content=json.dumps(HI).encode(), headers=[
        (b"Authorization", "Bearer clé".encode("utf-8")), (b"Content-Type", b"application/json")])
    openai_error(response, 401, code="invalid_api_key")


# -- client errors are 400 with param; a server error is OpenAI-shaped --------------------------------------------

@pytest.mark.parametrize("change, param", [
    ({"seed": 2 ** 70}, "seed"),
    ({"seed": -(2 ** 64)}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_tokens": 2 ** 40}, "max_tokens"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"stream_options": {"include_obfuscation": True}, "stream": True}, "stream_options.include_obfuscation"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "hi", "name": "alice"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
])
def test_what_the_server_does_not_honour_is_refused_with_its_param(server, change, param):
    body = {**HI, **change}
    content = json.dumps(body, allow_nan=True).encode()
    response = httpx.post(server + "/v1/chat/completions", content=content,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    openai_error(response, 400, param=param)
    still_serving(server)


@pytest.mark.parametrize("change", [
    {"response_format": {"type": "text"}}, {"logit_bias": {}}, {"tool_choice": "none"}, {"tools": []},
    {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "parallel_tool_calls": True},
    {"user": "u-1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto"},
    {"stream": None, "seed": 2 ** 64 - 1, "modalities": ["text"]},
    {"messages": [{"role": "user", "content": "hi", "name": None, "refusal": None, "tool_calls": None}]},
])
def test_neutral_values_and_bookkeeping_fields_are_accepted(server, change):
    assert post(server, {**HI, **change}).status_code == 200


def test_a_conversation_that_starts_with_the_assistant_is_answered(server):
    reply = post(server, {**HI, "messages": [{"role": "assistant", "content": "Hello! How can I help?"},
                                             {"role": "user", "content": "hi"}]})
    assert reply.status_code == 200, reply.text


def test_a_conversation_the_chat_template_refuses_is_a_400(engine, server):
    tokenizer = engine.generator.encoder.template.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversations must "
                               "start with a user message') }}{% endif %}" + saved)
    try:
        response = post(server, {**HI, "messages": [{"role": "assistant", "content": "Hi!"},
                                                    {"role": "user", "content": "hi"}]})
        error = openai_error(response, 400, param="messages")
        assert "must start with a user message" in error["message"]
    finally:
        tokenizer.chat_template = saved
    still_serving(server)


def test_an_unexpected_failure_is_an_openai_shaped_500_and_the_server_goes_on(server, engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(engine, "prepare", broken)
    error = openai_error(post(server, HI), 500)
    assert error["type"] == "server_error"
    monkeypatch.undo()
    still_serving(server)
