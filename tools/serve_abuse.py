"""Measure what a hostile client costs a running `glmtune serve`: an oversize body, and dropped requests.

    glmtune serve --port 8000 &
    python tools/serve_abuse.py --url http://127.0.0.1:8000

1. `oversize`: one client sends a 50 MB body while another asks a short question; prints how long the big
   body took to be answered (413) and how long the short question took.
2. `dropped`: three clients each ask for 300 tokens (not streamed) and hang up after one second; then one
   client asks for 8 tokens. Prints how long that last request took: it waits for nothing when dropped
   requests are cancelled.

Prints one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from urllib.parse import urlsplit


def _ask(base: str, content: str, max_tokens: int, key: str | None) -> tuple[int, float]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    r = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=3600,
                   json={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
    return r.status_code, time.perf_counter() - start


def _oversize(base: str, megabytes: int, key: str | None) -> dict:
    import httpx

    body = json.dumps({"messages": [{"role": "user", "content": "x" * (megabytes * 1_000_000)}]}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    result: dict = {}

    def big() -> None:
        start = time.perf_counter()
        try:
            r = httpx.post(f"{base}/v1/chat/completions", content=body, headers=headers, timeout=3600)
            result["oversize_status"] = r.status_code
        except httpx.HTTPError as e:  # a server may close the connection while the body is still being sent
            result["oversize_status"] = f"connection closed ({type(e).__name__})"
        result["oversize_seconds"] = round(time.perf_counter() - start, 2)

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.05)
    status, seconds = _ask(base, "What is 2 plus 2?", 8, key)
    thread.join()
    return {**result, "other_client_status": status, "other_client_seconds": round(seconds, 2)}


def _drop(base: str, max_tokens: int, after: float, key: str | None) -> None:
    """A whole-answer request whose client closes the connection after `after` seconds."""
    parts = urlsplit(base)
    payload = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
                          "max_tokens": max_tokens}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n")
    with socket.create_connection((parts.hostname, parts.port or 80)) as conn:
        conn.sendall(head.encode() + payload)
        time.sleep(after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--dropped", type=int, default=3)
    parser.add_argument("--dropped-tokens", type=int, default=300)
    args = parser.parse_args()
    base = args.url.rstrip("/")

    _ask(base, "Hi", 1, args.api_key)  # warm up
    status, alone = _ask(base, "What is 2 plus 2?", 8, args.api_key)
    figures = {"short_question_alone_seconds": round(alone, 2)}
    figures.update(_oversize(base, args.megabytes, args.api_key))

    droppers = [threading.Thread(target=_drop, args=(base, args.dropped_tokens, 1.0, args.api_key))
                for _ in range(args.dropped)]
    for t in droppers:
        t.start()
    for t in droppers:
        t.join()
    status, after = _ask(base, "What is 2 plus 2?", 8, args.api_key)
    figures.update({"dropped_requests": args.dropped, "dropped_max_tokens": args.dropped_tokens,
                    "next_request_status": status, "next_request_seconds": round(after, 2)})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
