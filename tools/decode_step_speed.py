"""Time one decoding step of the continuous batcher for 1, 8, 20 and 40 sequences on the default model (or
--model), after their prompts are in the cache. Prints one JSON line per batch size: milliseconds per step and
tokens per second.

    python tools/decode_step_speed.py [--model PATH] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from glmtune.data.formats import Message
    from glmtune.inference.batching import ContinuousBatcher, Sequence
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    loaded = load_model(args.model) if args.model else load_model()
    generator = Generator(loaded)
    prompt = generator.prompt_ids([Message("user", "Tell me a long story about a dragon and a knight.")])
    for rows in (1, 8, 20, 40):
        batcher = ContinuousBatcher(loaded.model, stop_ids=set(), max_batch=rows)
        for _ in range(rows):
            batcher.add(Sequence(prompt, args.steps + 8))
        while batcher.joining:
            batcher.step()
        started = time.perf_counter()
        for _ in range(args.steps):
            batcher.step()
        seconds = (time.perf_counter() - started) / args.steps
        print(json.dumps({"sequences": rows, "ms_per_step": round(seconds * 1000, 1),
                          "tokens_per_s": round(rows / seconds, 1)}))


if __name__ == "__main__":
    main()
