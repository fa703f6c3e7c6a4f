"""Load a running `glmtune serve` with concurrent OpenAI clients and print what they saw.

    glmtune serve --port 8000 &
    python tools/serve_load.py --url http://127.0.0.1:8000/v1 --requests 500 --concurrency 20 --max-tokens 64 \
        --stream [--model a --model b --model c] [--server-pid PID]

Each client sends its requests one after another; each request asks a different question (greedy). With
several --model the requests take them in turn (adapters mixed in the server's batch). Prints one JSON line:
requests, errors, wall time, aggregate completion tokens per second, latency percentiles and, streamed, time to
first token percentiles (seconds), per model too; with --server-pid, the server's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

TOPICS = ["a lighthouse keeper", "a lost kitten", "the first snow", "a robot learning to paint", "a night train",
          "a market in Chengdu", "an old violin", "a city under the sea", "a summer storm", "a chess tournament"]


def question(i: int, long: bool) -> str:
    if long:  # answers that run to the token limit
        return f"Write a long story about {TOPICS[i % len(TOPICS)]} (number {i})."
    return f"What is {i} plus {i + 1}?"


def percentiles(values: list[float], names=(50, 90, 99)) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {**{f"p{n}": round(cuts[n - 1], 3) for n in names}, "max": round(values[-1], 3)}


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM) in MiB, from /proc."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server's base URL, ending in /v1")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--stream", action="store_true", help="stream every answer (measures time to first token)")
    parser.add_argument("--model", action="append", default=None,
                        help="model (adapter) name to ask; repeatable: requests take them in turn")
    parser.add_argument("--short", action="store_true", help="short arithmetic questions instead of stories")
    parser.add_argument("--server-pid", type=int, default=None, help="report this process's peak resident memory")
    args = parser.parse_args()

    from openai import OpenAI

    models = args.model or ["m"]
    client = OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=3600)

    def one(i: int) -> dict:
        model = models[i % len(models)]
        messages = [{"role": "user", "content": question(i, not args.short)}]
        start = time.perf_counter()
        first = None
        try:
            if args.stream:
                tokens = 0
                for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                            stream=True, stream_options={"include_usage": True}):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            else:
                tokens = client.chat.completions.create(model=model, messages=messages,
                                                        max_tokens=args.max_tokens).usage.completion_tokens
            return {"model": model, "latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}
        except Exception as e:  # counted, not raised: a load test reports its errors
            return {"model": model, "latency": time.perf_counter() - start, "ttft": None, "tokens": 0,
                    "error": f"{type(e).__name__}: {e}"}

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - started

    def summary(rows: list[dict]) -> dict:
        ok = [r for r in rows if "error" not in r]
        errors = [r["error"] for r in rows if "error" in r]
        out = {"requests": len(rows), "errors": len(errors), "first_error": errors[0] if errors else None,
               "completion_tokens": sum(r["tokens"] for r in ok),
               "completion_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
               "latency_s": percentiles([r["latency"] for r in ok])}
        if args.stream:
            out["ttft_s"] = percentiles([r["ttft"] for r in ok if r["ttft"] is not None])
        return out

    report = {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "stream": args.stream,
              "wall_s": round(wall, 2), **summary(results)}
    if len(models) > 1:
        report["per_model"] = {m: summary([r for r in results if r["model"] == m]) for m in models}
    if args.server_pid:
        report["server_peak_rss_mib"] = peak_rss_mib(args.server_pid)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
