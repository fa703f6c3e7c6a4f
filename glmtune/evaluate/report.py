"""Before/after comparison: a metric table for the terminal and a report.md with examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.evaluate.metrics import GENERATION_KEYS, LABELS, TASK_KEYS, TASKS, align
from glmtune.files import write_text


def _fmt(template: str, value: Any) -> str:
    return "n/a" if value is None else template.format(value)


def comparison_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(group, metric, before, after) rows: eval loss (when given), the overall metrics, then per task its
    own metrics first (they say most about a structured task) and its generation metrics."""
    rows = []
    if "eval_loss" in before or "eval_loss" in after:
        rows.append(("", "eval loss", _fmt("{:.4f}", before.get("eval_loss")),
                     _fmt("{:.4f}", after.get("eval_loss"))))
    groups = [("overall", {"samples": before.get("samples"), **before.get("overall", {})},
               {"samples": after.get("samples"), **after.get("overall", {})})]
    groups += [(task, before.get("tasks", {}).get(task, {}), after.get("tasks", {}).get(task, {})) for task in TASKS
               if task in before.get("tasks", {}) or task in after.get("tasks", {})]
    for name, b, a in groups:
        samples = a.get("samples") if a.get("samples") is not None else b.get("samples")
        group = f"{name} ({samples} row{'' if samples == 1 else 's'})"
        for key in (*TASK_KEYS.get(name, ()), *GENERATION_KEYS):
            if key in a or key in b:
                rows.append((group, LABELS[key], _fmt("{:.2f}", b.get(key)), _fmt("{:.2f}", a.get(key))))
    return rows


def comparison_table(before: dict[str, Any], after: dict[str, Any], *, markdown: bool = False) -> str:
    """Before/after side by side; scores are percentages, eval loss is in nats per answer token."""
    rows = comparison_rows(before, after)
    if markdown:
        lines = ["| metric | before | after |", "| --- | ---: | ---: |"]
        lines += [f"| {f'{group}: ' if group else ''}{label} | {b} | {a} |" for group, label, b, a in rows]
        return "\n".join(lines)
    table, group = [["metric", "before", "after"]], ""
    for row_group, label, b, a in rows:
        if row_group != group:
            group = row_group
            table.append([group, "", ""])
        table.append([f"  {label}" if group else label, b, a])
    return align(table) + "\n(scores in %, 0-100; definitions in docs/metrics.md)"


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
            "Scores are percentages (0-100) over the evaluated rows. Each row's task comes from its reference: "
            "a JSON list of triples is extraction (scored by triple precision, recall and F1), a JSON list of "
            "labels is classification (accuracy, micro F1), anything else is generation. BLEU-4 and ROUGE are "
            "computed as in the ChatGLM official evaluation; exact match compares the trimmed texts. "
            "Definitions: docs/metrics.md.", "",
            "## Examples", "", format_examples(examples, markdown=True), "", "## Files", "",
            *[f"- `{name}`" for name in files], ""]
    write_text(path, "\n".join(text))  # whole or not at all
    return path
