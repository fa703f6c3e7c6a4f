"""Answer-level metrics, each with one definition (see docs/metrics.md).

- exact match: prediction and reference equal after stripping surrounding whitespace.
- parse rate: the share of predictions that parse as the answer shape the reference has: for a
  reference that is a JSON list of objects (optionally in a ```json fenced block; the extraction task),
  a JSON list of objects with subject, predicate and object strings; for a reference that is a JSON
  list of strings (the classification task), a JSON list of strings. References of other shapes (free
  text) have no parse rate.
"""

from __future__ import annotations

import json
import re
from typing import Any

FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
TRIPLE_KEYS = ("subject", "predicate", "object")


def _json(text: str) -> Any:
    match = FENCE.search(text)
    body = match.group(1) if match else text.strip()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None


def answer_kind(reference: str) -> str:
    """'extraction' (a list of triples), 'classification' (a list of labels) or 'text'."""
    value = _json(reference)
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return "extraction"
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return "classification"
    return "text"


def parses_as(prediction: str, kind: str) -> bool:
    value = _json(prediction)
    if not isinstance(value, list):
        return False
    if kind == "extraction":
        return all(isinstance(x, dict) and all(isinstance(x.get(k), str) for k in TRIPLE_KEYS) for x in value)
    if kind == "classification":
        return all(isinstance(x, str) for x in value)
    return False


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def score_predictions(rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Metrics (percentages) over (prediction, reference) pairs, overall and per answer kind."""
    out: dict[str, Any] = {"samples": len(rows)}
    if not rows:
        return out
    out["exact_match"] = 100.0 * sum(exact_match(p, r) for p, r in rows) / len(rows)
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for prediction, reference in rows:
        by_kind.setdefault(answer_kind(reference), []).append((prediction, reference))
    structured = [(p, k) for k, pairs in by_kind.items() if k != "text" for p, _ in pairs]
    if structured:
        out["parse_rate"] = 100.0 * sum(parses_as(p, k) for p, k in structured) / len(structured)
    out["by_kind"] = {}
    for kind, pairs in sorted(by_kind.items()):
        entry = {"samples": len(pairs), "exact_match": 100.0 * sum(exact_match(p, r) for p, r in pairs) / len(pairs)}
        if kind != "text":
            entry["parse_rate"] = 100.0 * sum(parses_as(p, kind) for p, _ in pairs) / len(pairs)
        out["by_kind"][kind] = entry
    return out
