"""Load a running `glmtune serve` with concurrent OpenAI clients and print latency percentiles.

    glmtune serve --port 8000 &
    python tools/serve_load.py --url http://127.0.0.1:8000/v1 --requests 20 --concurrency 20 --max-tokens 32

Each request asks a different short question (greedy). Prints one JSON line: requests, errors, wall time,
completion tokens per second, and latency p50/p90/p99/max in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server's base URL, ending in /v1")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--stream", action="store_true", help="stream every answer")
    args = parser.parse_args()

    from openai import OpenAI

    def one(i: int) -> tuple[float, int, str | None]:
        client = OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=3600)
        start = time.perf_counter()
        try:
            messages = [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]
            if args.stream:
                chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=args.max_tokens,
                                                             stream=True, stream_options={"include_usage": True}))
                tokens = chunks[-1].usage.completion_tokens
            else:
                tokens = client.chat.completions.create(model="m", messages=messages,
                                                        max_tokens=args.max_tokens).usage.completion_tokens
            return time.perf_counter() - start, tokens, None
        except Exception as e:  # counted, not raised: a load test reports its errors
            return time.perf_counter() - start, 0, f"{type(e).__name__}: {e}"

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    errors = [r[2] for r in results if r[2]]
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                      "stream": args.stream, "errors": len(errors), "first_error": errors[0] if errors else None,
                      "wall_s": round(wall, 2), "completion_tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
                      "latency_s": {"p50": round(cuts[49], 2), "p90": round(cuts[89], 2), "p99": round(cuts[98], 2),
                                    "max": round(latencies[-1], 2)}}))


if __name__ == "__main__":
    main()
