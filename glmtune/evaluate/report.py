"""Before/after comparison: a metric table for the terminal and a report.md with examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROWS = (("eval_loss", "eval loss", "{:.4f}"), ("exact_match", "exact match", "{:.1f}%"),
        ("parse_rate", "answers that parse", "{:.1f}%"))


def _fmt(template: str, value: Any) -> str:
    return "n/a" if value is None else template.format(value)


def comparison_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, before, after) rows: overall metrics, then exact match and parse rate per answer kind."""
    rows = [(label, _fmt(t, before.get(key)), _fmt(t, after.get(key))) for key, label, t in ROWS]
    for kind in sorted(set(before.get("by_kind", {})) | set(after.get("by_kind", {}))):
        b, a = before.get("by_kind", {}).get(kind, {}), after.get("by_kind", {}).get(kind, {})
        samples = a.get("samples", b.get("samples", 0))
        for key, label, t in ROWS[1:]:
            if key in a or key in b:
                rows.append((f"  {kind} ({samples}): {label}", _fmt(t, b.get(key)), _fmt(t, a.get(key))))
    return rows


def comparison_table(before: dict[str, Any], after: dict[str, Any], *, markdown: bool = False) -> str:
    rows = comparison_rows(before, after)
    if markdown:
        lines = ["| metric | before | after |", "| --- | ---: | ---: |"]
        lines += [f"| {label.strip()} | {b} | {a} |" for label, b, a in rows]
        return "\n".join(lines)
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"{'metric':<{width}}{'before':>10}{'after':>10}"]
    lines += [f"{label:<{width}}{b:>10}{a:>10}" for label, b, a in rows]
    return "\n".join(lines)


def format_examples(examples: list[dict[str, str]], *, markdown: bool = False) -> str:
    """Each example: prompt, reference, before, after."""
    blocks = []
    for i, ex in enumerate(examples, start=1):
        if markdown:
            # Four backticks: answers may hold ```json fences of their own.
            parts = [f"**{name.capitalize()}**\n\n````text\n{ex[name]}\n````"
                     for name in ("prompt", "reference", "before", "after")]
            blocks.append(f"### Example {i}\n\n" + "\n\n".join(parts))
        else:
            blocks.append(f"--- example {i} ---\nprompt:    {_one_line(ex['prompt'])}\n"
                          f"reference: {_one_line(ex['reference'])}\nbefore:    {_one_line(ex['before'])}\n"
                          f"after:     {_one_line(ex['after'])}")
    return "\n\n".join(blocks)


def _one_line(text: str, limit: int = 300) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= limit else flat[:limit] + "..."


def write_report(path: Path, *, title: str, setup: list[str], before: dict[str, Any], after: dict[str, Any],
                 examples: list[dict[str, str]], files: list[str]) -> Path:
    text = [f"# {title}", "", *[f"- {line}" for line in setup], "", "## Results", "",
            comparison_table(before, after, markdown=True), "",
            "Exact match: the answer equals the reference after trimming whitespace. Answers that parse: the "
            "share of answers that parse as the reference's shape (a JSON list of triples for extraction, a "
            "JSON list of labels for classification). See docs/metrics.md.", "",
            "## Examples", "", format_examples(examples, markdown=True), "", "## Files", "",
            *[f"- `{name}`" for name in files], ""]
    path.write_text("\n".join(text), encoding="utf-8")
    return path
