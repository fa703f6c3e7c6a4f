"""`glmtune data stats`: token lengths of prompts and answers, and what given limits would cut.

Lengths are counted with the model's tokenizer and prompt template, per trained turn (a single-turn
sample has one): the prompt includes the template's scaffolding, the answer its end token. Cut counts
come from running the real tokenization with those limits, so they are exactly what `train` reports.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from glmtune.data.formats import Sample, load_samples
from glmtune.data.preprocess import Encoder, LengthLimits
from glmtune.data.templates import get_template
from glmtune.errors import GlmtuneError

CANDIDATE_CUTOFFS = (128, 256, 512, 1024, 2048, 4096)
LONG_TEXT = 100_000  # characters: a text this long is tokenized once per stats run, not once per limit counted


def percentile(values: list[int], q: float) -> int:
    """The nearest-rank percentile (the smallest value with at least q% of values at or below it)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def describe(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {"max": ordered[-1], "mean": sum(ordered) / n, "median": median,
            "p95": percentile(ordered, 95), "p99": percentile(ordered, 99)}


@dataclass
class LengthStats:
    samples: int
    prompt: dict[str, float]
    answer: dict[str, float]
    total: dict[str, float]
    cut_at: dict[str, int]  # described limits -> samples cut
    suggestions: dict[str, LengthLimits]  # "cut none" / "cut at most 1%" -> limits


def count_cut(samples: list[Sample], encoder: Encoder, limits: LengthLimits) -> int:
    return sum(encoder.encode(s, limits)[1].any for s in samples)


def _remembering_long_texts(encoder: Encoder) -> Encoder:
    """A copy of `encoder` that tokenizes each long text only once. Stats encode every sample once per limit
    they count (about ten times): for a 10 MB row that would take minutes; short texts are cheap to repeat
    and are not kept."""
    memo: dict[str, list[int]] = {}
    tokens = encoder._tokens

    def remembered(text: str) -> list[int]:
        if len(text) < LONG_TEXT:
            return tokens(text)
        if text not in memo:
            memo[text] = tokens(text)
        return memo[text]

    remembering = copy.copy(encoder)
    remembering._tokens = remembered
    return remembering


def length_stats(samples: list[Sample], encoder: Encoder, limits: LengthLimits | None = None) -> LengthStats:
    encoder = _remembering_long_texts(encoder)
    views, turns = [], []
    for sample in samples:
        try:
            for view in encoder.views(sample):  # what training tokenizes
                turns.append(encoder.lengths(view))
                views.append(view)
        except GlmtuneError as e:  # e.g. a conversation the layout cannot write: say which row
            raise GlmtuneError(f"{sample.where}: {e}" if sample.where else str(e)) from None
    samples = views
    prompts = [src for sample in turns for src, _ in sample]
    answers = [tgt for sample in turns for _, tgt in sample]
    totals = [sum(src + tgt for src, tgt in sample) for sample in turns]
    cut_at: dict[str, int] = {}
    if limits is not None and any(v is not None for v in vars(limits).values()):
        cut_at[limits.describe()] = count_cut(samples, encoder, limits)
    for cutoff in CANDIDATE_CUTOFFS:
        if cutoff < max(totals) * 2:
            candidate = LengthLimits(cutoff_len=cutoff)
            cut_at[candidate.describe()] = count_cut(samples, encoder, candidate)
    suggestions = {
        "cut none": LengthLimits(max(prompts), max(answers)),
        "99th percentiles": LengthLimits(percentile(prompts, 99), percentile(answers, 99)),
        "cut none (one cutoff_len)": LengthLimits(cutoff_len=max(totals)),
    }
    for candidate in suggestions.values():
        cut_at.setdefault(candidate.describe(), count_cut(samples, encoder, candidate))
    return LengthStats(len(samples), describe(prompts), describe(answers), describe(totals), cut_at, suggestions)


def stats_dict(stats: LengthStats) -> dict[str, Any]:
    """The numbers as `glmtune data stats --json` prints them (plain values, suggestions as mappings)."""
    data = asdict(stats)
    data["suggestions"] = {k: asdict(v) for k, v in stats.suggestions.items()}
    return data


def format_stats(stats: LengthStats, title: str) -> str:
    w = max(8, len(str(stats.total["max"])) + 3)  # wide enough for a row of millions of tokens
    lines = [title, "", f"{'tokens':<10}{'max':>{w}}{'mean':>{w + 1}}{'median':>{w + 1}}{'p95':>{w}}{'p99':>{w}}"]
    for name in ("prompt", "answer", "total"):
        d = getattr(stats, name)
        lines.append(f"{name:<10}{d['max']:>{w}}{d['mean']:>{w + 1}.1f}{d['median']:>{w + 1}.1f}{d['p95']:>{w}}"
                     f"{d['p99']:>{w}}")
    lines += ["", f"samples cut (of {stats.samples}) at:"]
    width = max(len(k) for k in stats.cut_at)
    for described, cut in stats.cut_at.items():
        lines.append(f"  {described:<{width}}  {cut:>6}  ({100.0 * cut / stats.samples:.1f}%)")
    lines += ["", "suggested limits:"]
    for name, limits in stats.suggestions.items():
        cut = stats.cut_at[limits.describe()]
        lines.append(f"  {name + ':':<28}{limits.describe()}  ({cut} cut)")
    return "\n".join(lines)


def file_stats(path: str, tokenizer: Callable[[], tuple[Any, str, set[int]]], *, template: str = "auto",
               limits: LengthLimits, as_json: bool = False, model_name: str, train_on: str = "all_assistant",
               **columns) -> str:
    """What `glmtune data stats` prints for a data file: the table, or the numbers as JSON. `tokenizer()`
    gives (tokenizer, family, stop ids): the caller loads it (data sits below the model layer), once the
    file has been read, so a bad file is reported before a tokenizer is loaded."""
    samples, _ = load_samples(path, **columns)
    loaded, family, stop_ids = tokenizer()
    prompt_format = get_template(template, loaded, family)
    stats = length_stats(samples, Encoder(loaded, prompt_format, stop_ids, train_on=train_on), limits)
    if as_json:
        return json.dumps(stats_dict(stats), indent=2)
    return format_stats(stats, f"{path}: {stats.samples} samples, tokenizer of {model_name}, "
                               f"template {prompt_format.name}")
