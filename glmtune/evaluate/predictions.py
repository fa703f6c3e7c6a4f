"""The streamed, resumable predictions file of `glmtune predict`, `eval` and the demo: every row answered in
batches (glmtune.inference.generate) and written as soon as its batch is done."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from glmtune.config import GenerationOptions
from glmtune.data.formats import Sample
from glmtune.errors import GlmtuneError
from glmtune.files import NestingError, is_special, loads, path_error, status
from glmtune.inference.generate import Generator
from glmtune.oom import free_memory, is_out_of_memory, on_cpu, where

log = logging.getLogger(__name__)


def prediction_row(sample: Sample, answer: str) -> dict:
    """The input row plus `prediction`, and `target` (the reference answer) when the row names it otherwise,
    so every predictions file can be scored by `glmtune metrics`."""
    row = dict(sample.row)
    if sample.has_answer and "target" not in row:
        row["target"] = sample.reference
    row["prediction"] = answer
    return row


def _kept_rows(path: Path, samples: list[Sample], batch_size: int) -> tuple[list[dict], int]:
    """Rows of an earlier, interrupted run that can be kept, and their length in bytes: complete lines, in
    whole batches (so later batches are the same as in an uninterrupted run), each belonging to the same
    sample as now."""
    rows: list[dict] = []
    ends: list[int] = []  # byte offset after each kept row
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # cut off mid-line by the interruption
            try:
                row = loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, NestingError):
                break
            if len(rows) >= len(samples):
                raise GlmtuneError(f"{path} holds more rows than the data has; it was written for other data "
                                   "(start over with --overwrite)")
            expected = prediction_row(samples[len(rows)], "")
            if not isinstance(row, dict) or {k: v for k, v in row.items() if k != "prediction"} != \
                    {k: v for k, v in expected.items() if k != "prediction"}:
                raise GlmtuneError(f"{path} line {len(rows) + 1} does not belong to row {len(rows) + 1} of the data; "
                                   "it was written for other data (start over with --overwrite)")
            rows.append(row)
            offset += len(raw)
            ends.append(offset)
    keep = len(rows) if len(rows) == len(samples) else len(rows) // batch_size * batch_size
    return rows[:keep], ends[keep - 1] if keep else 0


def _out_of_memory_message(error: BaseException, generator: Generator, generation: GenerationOptions | None,
                           start: int, size: int, total: int, batch_size: int) -> str:
    """Which rows ran out of memory, and the values that would lower what answering them needs."""
    generation = generation or GenerationOptions()
    lower = [f"--batch-size ({batch_size})"] if batch_size > 1 else []
    lower.append(f"--max-new-tokens ({generation.max_new_tokens})")
    source = generator.limits.max_source_length if generator.limits else None
    changes = ["lower " + " or ".join(lower), f"lower --max-source-length ({source})" if source else
               "cut long prompts with --max-source-length"]
    bits = generator.quantization_bit
    if bits != 4 and not on_cpu(error):  # the int4 kernels are for the GPU
        changes.append(f"load the base with --quantization-bit 4 (now {bits or 'full weights'})")
    rows = f"row {start + 1}" if size == 1 else f"rows {start + 1}-{start + size}"
    return f"out of memory on {where(error)} answering {rows} of {total}: {', '.join(changes)}"


def write_predictions(generator: Generator, samples: list[Sample], output_path: str | Path, *,
                      batch_size: int = 8, generation: GenerationOptions | None = None, progress: bool = True,
                      resume: bool = False, seed: int | None = None, check_lengths: bool = True,
                      keep_partial: bool = False) -> list[str]:
    """Answers every sample in order and writes `prediction_row`s to `output_path` (JSONL), batch by batch
    as they finish. Returns the answers.

    With `resume`, the rows an interrupted run already wrote are kept and generation continues after them,
    so the file ends as an uninterrupted run's would. With `seed`, each batch is seeded from the seed and
    its position, so sampled answers do not depend on where a run resumed either. A prompt too long for the
    model is refused before anything is written (`check_lengths` False: the caller has checked). A write
    that fails (a full disk) is one GlmtuneError; the partial file is removed unless `keep_partial` (eval,
    which continues it when run again)."""
    from tqdm.auto import tqdm

    if check_lengths:
        generator.check_prompts(samples)
    output_path = Path(output_path)
    kept, kept_bytes = _kept_rows(output_path, samples, batch_size) if resume and output_path.exists() else ([], 0)
    if kept:
        log.info("%s: %d of %d rows already answered; continuing", output_path, len(kept), len(samples))
    answers = [row["prediction"] for row in kept]
    special = is_special(status(output_path))  # /dev/null, /dev/stdout: written in place
    out_of_memory = None  # the message, once a batch ran out of memory (reported after the file is closed)
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        if not kept and not special and output_path.is_symlink():
            output_path.unlink()  # a link is replaced itself; the file it points to is never written
        with output_path.open("r+" if kept else "w", encoding="utf-8") as out, \
                tqdm(total=len(samples), initial=len(kept), desc="generating", unit="sample",
                     disable=not progress) as bar:
            if not special:
                out.truncate(kept_bytes)  # drop what comes after the kept rows (a cut line, a partial batch)
                out.seek(kept_bytes)
            for start in range(len(kept), len(samples), batch_size):
                batch = samples[start:start + batch_size]
                if seed is not None:
                    torch.manual_seed(seed + start)
                try:
                    tools = [s.tools for s in batch] if any(s.tools for s in batch) else None
                    batch_answers = generator.generate([s.prompt_messages for s in batch], generation, tools)
                except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
                    if not is_out_of_memory(e):
                        raise
                    out_of_memory = _out_of_memory_message(e, generator, generation, start, len(batch), len(samples),
                                                           batch_size)
                    break
                for sample, answer in zip(batch, batch_answers):
                    out.write(json.dumps(prediction_row(sample, answer), ensure_ascii=False) + "\n")
                out.flush()
                answers += batch_answers
                bar.update(len(batch))
    except OSError as e:  # a full disk, /dev/full: one line, and no half-written file left as if it were whole
        if not keep_partial and not special:
            output_path.unlink(missing_ok=True)
        error = path_error(output_path, e, "cannot write")
        if keep_partial and not special:
            error = GlmtuneError(f"{error}; the answers written so far are kept: run the same command again to "
                                 "continue")
        raise error from None
    if out_of_memory:
        free_memory()
        if keep_partial and not special:
            raise GlmtuneError(f"{out_of_memory}; the {len(answers)} answers written so far are kept: run the same "
                               "command again (with a lower --batch-size) to continue; a new --max-new-tokens, "
                               "--max-source-length or --quantization-bit changes the answers: start over with "
                               "--overwrite")
        if not special:
            output_path.unlink(missing_ok=True)
        raise GlmtuneError(f"{out_of_memory}; nothing was written")
    if generator.prompts_cut:
        log.warning("%d prompts were longer than the limit and were cut", generator.prompts_cut)
    return answers
