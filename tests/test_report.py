"""The before/after table and report.md built from compute_metrics results."""

from glmtune.evaluate.report import comparison_table, write_report

BEFORE = {"samples": 3, "task": "auto", "eval_loss": 2.5,
          "overall": {"exact_match": 0.0, "bleu-4": 1.5, "rouge-1": 10.0, "rouge-2": 5.0, "rouge-l": 8.0},
          "tasks": {"classification": {"samples": 2, "exact_match": 0.0, "bleu-4": 2.0, "rouge-1": 12.0,
                                       "rouge-2": 6.0, "rouge-l": 9.0, "parse_rate": 0.0, "accuracy": 0.0,
                                       "micro_f1": 0.0}}}
AFTER = {"samples": 3, "task": "auto", "eval_loss": None,
         "overall": {"exact_match": 66.6667, "bleu-4": 70.25, "rouge-1": 80.0, "rouge-2": 75.0, "rouge-l": 80.0},
         "tasks": {"classification": {"samples": 2, "exact_match": 100.0, "bleu-4": 100.0, "rouge-1": 100.0,
                                      "rouge-2": 100.0, "rouge-l": 100.0, "parse_rate": 100.0, "accuracy": 100.0,
                                      "micro_f1": 100.0},
                   "extraction": {"samples": 1, "exact_match": 0.0, "bleu-4": 10.5, "rouge-1": 40.0,
                                  "rouge-2": 25.0, "rouge-l": 40.0, "parse_rate": 100.0, "precision": 50.0,
                                  "recall": 33.3333, "f1": 40.0}}}


def test_terminal_table_groups_overall_and_per_task_rows():
    lines = comparison_table(BEFORE, AFTER).splitlines()
    assert lines[0].split() == ["metric", "before", "after"]
    assert lines[1].split() == ["eval", "loss", "2.5000", "n/a"]  # the after loss is missing
    assert lines[2].strip() == "overall (3 rows)" and lines[3].split() == ["exact", "match", "0.00", "66.67"]
    # Tasks in a fixed order, own metrics first; a task only one side has shows n/a on the other.
    extraction = lines.index("extraction (1 row)")
    assert lines[extraction + 1].split() == ["answers", "that", "parse", "n/a", "100.00"]
    assert [line.split()[0] for line in lines[extraction + 2:extraction + 4]] == ["precision", "recall"]
    classification = lines.index("classification (2 rows)")
    assert extraction < classification
    assert lines[classification + 2].split() == ["accuracy", "0.00", "100.00"]
    assert "docs/metrics.md" in lines[-1]


def test_markdown_table_and_report(tmp_path):
    table = comparison_table(BEFORE, AFTER, markdown=True).splitlines()
    assert table[:3] == ["| metric | before | after |", "| --- | ---: | ---: |", "| eval loss | 2.5000 | n/a |"]
    assert "| overall (3 rows): BLEU-4 | 1.50 | 70.25 |" in table
    assert "| extraction (1 row): F1 | n/a | 40.00 |" in table
    assert "| classification (2 rows): micro F1 | 0.00 | 100.00 |" in table
    report = write_report(tmp_path / "report.md", title="t", setup=["s"], before=BEFORE, after=AFTER,
                          examples=[{"prompt": "p", "reference": "r", "before": "b", "after": "a"}], files=["x"])
    text = report.read_text(encoding="utf-8")
    assert "| eval loss |" in text and "docs/metrics.md" in text and "### Example 1" in text


def test_no_eval_loss_row_without_eval_loss():
    before = {key: value for key, value in BEFORE.items() if key != "eval_loss"}
    after = {key: value for key, value in AFTER.items() if key != "eval_loss"}
    assert "eval loss" not in comparison_table(before, after)
