"""Answer metrics, each defined once (docs/metrics.md).

BLEU-4 and ROUGE make the same library calls as the ChatGLM-6B P-Tuning evaluation (LLaMA-Factory computes
them the same way), so a number here can be set beside theirs. The task metrics score what the tutorials' tasks ask
for: the set of triples for extraction, the set of labels for classification.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any, Callable, Iterable

TASKS = ("extraction", "classification", "generation")
TASK_CHOICES = ("auto", *TASKS)
ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
GENERATION_KEYS = ("exact_match", "bleu-4", *ROUGE_KEYS)
TASK_KEYS = {"extraction": ("parse_rate", "precision", "recall", "f1"),
             "classification": ("parse_rate", "accuracy", "micro_f1"), "generation": ()}
# Every key a result can hold, in the order tables show them.
ORDER = ("samples", *GENERATION_KEYS, "parse_rate", "precision", "recall", "f1", "accuracy", "micro_f1")
LABELS = {"samples": "samples", "exact_match": "exact match", "bleu-4": "BLEU-4", "rouge-1": "ROUGE-1",
          "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L", "parse_rate": "answers that parse", "precision": "precision",
          "recall": "recall", "f1": "F1", "accuracy": "accuracy", "micro_f1": "micro F1"}

FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)
# An opening fence whose closing one never came (the answer hit the token limit after the JSON).
OPEN_FENCE = re.compile(r"^```(?:json)?\s*", re.IGNORECASE)
TRIPLE_KEYS = ("subject", "predicate", "object")


def _json(text: str) -> Any:
    """The JSON value in a ```json fenced block, else the whole text; None when it does not parse."""
    match = FENCE.search(text)
    body = match.group(1) if match else OPEN_FENCE.sub("", text.strip())
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # an answer like [[[[... thousands deep is no answer that parses
        return None


def _triples(text: str) -> frozenset[tuple[str, ...]] | None:
    """The (subject, predicate, object) set of a JSON list of triple objects; None for any other shape."""
    value = _json(text)
    if not isinstance(value, list):
        return None
    triples = set()
    for item in value:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in TRIPLE_KEYS):
            return None
        triples.add(tuple(item[k].strip() for k in TRIPLE_KEYS))
    return frozenset(triples)


def _labels(text: str) -> frozenset[str] | None:
    """The label set of a JSON list of strings; None for any other shape."""
    value = _json(text)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        return None
    return frozenset(x.strip() for x in value)


def detect_task(target: str) -> str:
    """'extraction' (a non-empty list of triples), 'classification' (a list of strings, `[]` included)
    or 'generation'."""
    if _triples(target):
        return "extraction"
    if _labels(target) is not None:
        return "classification"
    return "generation"


@functools.lru_cache(maxsize=1)
def _jieba_cut() -> Callable[[str], Iterable[str]]:
    """jieba's word cutter, loaded on first use; its INFO lines about building the dictionary cache are
    noise in a CLI's output."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba.cut


def exact_match(prediction: str, target: str) -> bool:
    return prediction.strip() == target.strip()


def bleu4(prediction: str, target: str) -> float:
    """Sentence BLEU-4 on characters with smoothing method 3, x100 (the ChatGLM evaluation's call);
    0 when either side is empty."""
    if not prediction.strip() or not target.strip():
        return 0.0
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return 100.0 * float(sentence_bleu([list(target)], list(prediction),
                                       smoothing_function=SmoothingFunction().method3))


def rouge_scores(prediction: str, target: str) -> dict[str, float]:
    """ROUGE-1/2/L F scores x100 on jieba words (the ChatGLM evaluation's call); 0 when either side is
    empty, which rouge_chinese would reject with an error."""
    if not prediction.strip() or not target.strip():
        return dict.fromkeys(ROUGE_KEYS, 0.0)
    from rouge_chinese import Rouge

    cut = _jieba_cut()
    scores = Rouge().get_scores(" ".join(cut(prediction)), " ".join(cut(target)))[0]
    return {key: 100.0 * scores[key]["f"] for key in ROUGE_KEYS}


def _generation_scores(prediction: str, target: str) -> dict[str, float]:
    return {"exact_match": 100.0 * exact_match(prediction, target), "bleu-4": bleu4(prediction, target),
            **rouge_scores(prediction, target)}


def _share(part: float, whole: float) -> float:
    """A percentage; 0 when there is nothing to count."""
    return 100.0 * part / whole if whole else 0.0


def _extraction_scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Triple precision/recall/F1 micro-averaged over the rows: sums of true positives, predicted and
    gold triples. An answer that does not parse predicts nothing; its gold triples still count."""
    parsed = hits = predicted = gold = 0
    for prediction, target in pairs:
        want = _triples(target) or frozenset()
        got = _triples(prediction)
        gold += len(want)
        if got is not None:
            parsed += 1
            predicted += len(got)
            hits += len(got & want)
    return {"parse_rate": _share(parsed, len(pairs)), "precision": _share(hits, predicted),
            "recall": _share(hits, gold), "f1": _share(2 * hits, predicted + gold)}


def _classification_scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Accuracy (the label set equals the gold set) and micro F1 over labels summed over the rows."""
    parsed = correct = hits = predicted = gold = 0
    for prediction, target in pairs:
        want = _labels(target) or frozenset()
        got = _labels(prediction)
        gold += len(want)
        if got is not None:
            parsed += 1
            correct += got == want
            predicted += len(got)
            hits += len(got & want)
    return {"parse_rate": _share(parsed, len(pairs)), "accuracy": _share(correct, len(pairs)),
            "micro_f1": _share(2 * hits, predicted + gold)}


TASK_SCORERS: dict[str, Callable[[list[tuple[str, str]]], dict[str, float]]] = {
    "extraction": _extraction_scores, "classification": _classification_scores, "generation": lambda pairs: {}}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(row[key] for row in rows) / len(rows) for key in GENERATION_KEYS}


def _rounded(scores: dict[str, Any]) -> dict[str, Any]:
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in scores.items()}


def compute_metrics(pairs: Iterable[tuple[str, str]], task: str = "auto") -> dict[str, Any]:
    """Scores (percentages, 4 decimals) for (prediction, target) pairs: generation metrics averaged over
    all rows ("overall") and per task, task metrics per task. `task` "auto" detects each row's task from
    its target; any other choice applies to every row."""
    if task not in TASK_CHOICES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_CHOICES)}")
    pairs = list(pairs)
    result: dict[str, Any] = {"samples": len(pairs), "task": task, "overall": {}, "tasks": {}}
    if not pairs:
        return result
    scored = [_generation_scores(prediction, target) for prediction, target in pairs]
    result["overall"] = _rounded(_mean(scored))
    rows_by_task: dict[str, list[int]] = {}
    for i, (_, target) in enumerate(pairs):
        rows_by_task.setdefault(detect_task(target) if task == "auto" else task, []).append(i)
    for name in TASKS:
        rows = rows_by_task.get(name)
        if rows:
            entry = {"samples": len(rows), **_mean([scored[i] for i in rows]),
                     **TASK_SCORERS[name]([pairs[i] for i in rows])}
            result["tasks"][name] = _rounded(entry)
    return result


def metrics_table(metrics: dict[str, Any]) -> str:
    """The metrics as a terminal table: one row per metric, one column for all rows and one per task."""
    if not metrics.get("samples"):
        return "no samples to score"
    columns = [("overall", {"samples": metrics["samples"], **metrics["overall"]}), *metrics["tasks"].items()]
    keys = [key for key in ORDER if any(key in values for _, values in columns)]
    header = ["metric", *(name for name, _ in columns)]
    body = [[LABELS[key], *(_cell(key, values.get(key)) for _, values in columns)] for key in keys]
    return align([header, *body]) + "\n(scores in %, 0-100; definitions in docs/metrics.md)"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if key == "samples" else f"{value:.2f}"


def align(rows: list[list[str]]) -> str:
    """Text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows)
    return "\n".join(line.rstrip() for line in lines)
