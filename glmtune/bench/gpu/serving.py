"""Section 3, serving: the OpenAI-compatible server `glmtune serve` runs (the same engine, app and uvicorn
server), on a random-weight ChatGLM3-6B on the device, answering one client and then many concurrent ones;
completion tokens/s and latency percentiles."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

SETTINGS = {"gpu": {"max_tokens": 64, "alone": 4, "clients": 16},
            "tiny": {"max_tokens": 8, "alone": 2, "clients": 4}}


class RunningServer:
    """`glmtune serve`'s server for `engine` on a free loopback port, in a thread, for a with-block."""

    def __init__(self, engine, name: str):
        from glmtune.serve.network import listen
        from glmtune.serve.openai_api import make_server

        self.sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.engine = engine
        self.server = make_server(engine, name)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "RunningServer":
        self.engine.start()
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


def load(url: str, name: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """`requests` chat completions from `concurrency` clients at once: tokens/s over the wall time and
    latency percentiles (seconds)."""
    import httpx

    def one(i: int) -> tuple[float, int, str | None]:
        question = f"第{i}个问题：请介绍一下你自己。"
        body = {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": 0}
        started = time.perf_counter()
        try:
            response = httpx.post(f"{url}/chat/completions", json=body, timeout=600)
            response.raise_for_status()
            return time.perf_counter() - started, response.json()["usage"]["completion_tokens"], None
        except Exception as e:  # counted, not raised: a load test reports its errors
            return time.perf_counter() - started, 0, f"{type(e).__name__}: {e}"

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    errors = [r[2] for r in results if r[2]]
    return {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": round(wall, 3),
            "completion_tokens": sum(r[1] for r in results),
            "completion_tokens_per_s": round(sum(r[1] for r in results) / wall, 2),
            "latency_s": {"p50": round(cuts[49], 3), "p90": round(cuts[89], 3), "p99": round(cuts[98], 3),
                          "max": round(latencies[-1], 3)}}


def run(shapes, device: str, record: Callable[[dict[str, Any]], None]) -> None:
    import torch

    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_random_model
    from glmtune.serve.engine import ChatEngine

    settings = SETTINGS["gpu" if device.startswith("cuda") else "tiny"]
    started = time.perf_counter()
    loaded = load_random_model(str(shapes.model("chatglm3")), device=device)
    build_s = time.perf_counter() - started
    engine = ChatEngine(Generator(loaded), generation=GenerationOptions(max_new_tokens=settings["max_tokens"]))
    name = "chatglm3-6b-random" + ("-tiny" if shapes.tiny else "")
    dtype = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
    with RunningServer(engine, name) as server:
        load(server.url, name, 1, 1, settings["max_tokens"])  # warm-up: first CUDA kernels, first request
        for label, requests, concurrency in (("1 client", settings["alone"], 1),
                                             (f"{settings['clients']} concurrent clients", settings["clients"],
                                              settings["clients"])):
            found = load(server.url, name, requests, concurrency, settings["max_tokens"])
            record({"name": f"serve {label}", "ok": found["errors"] == 0 and found["completion_tokens"] > 0,
                    "model": name, "dtype": dtype, "build_s": round(build_s, 2), **found})
    if device.startswith("cuda"):
        record({"name": "serve peak memory", "ok": True, "value": torch.cuda.max_memory_allocated()})
