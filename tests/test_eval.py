"""`glmtune eval`, `compare` and `metrics`, and answer metrics during training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from glmtune.cli import main


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """40 dev rows of the sample data (both tasks)."""
    from glmtune.paths import sample_data_dir

    path = tmp_path_factory.mktemp("eval-data") / "dev.jsonl"
    rows = (sample_data_dir() / "dev.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _eval_args(model_dir, data, out, *extra):
    return ["eval", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--batch-size", "4",
            "--max-new-tokens", "24", *extra]


def test_eval_writes_predictions_and_metrics_and_continues_a_cut_file(tiny_model_dir, eval_data, tmp_path, capsys):
    full = tmp_path / "full"
    assert main(_eval_args(tiny_model_dir, eval_data, full)) == 0
    assert "BLEU-4" in capsys.readouterr().out
    rows = _rows(full / "predictions.jsonl")
    assert len(rows) == 40 and all({"context", "target", "prediction"} <= row.keys() for row in rows)
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["samples"] == 40 and set(metrics["tasks"]) == {"extraction", "classification"}

    # An interruption in the middle of writing row 7 (the second batch of 4 is incomplete).
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "eval_config.json").write_text((full / "eval_config.json").read_text())
    lines = (full / "predictions.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (cut / "predictions.jsonl").write_text("".join(lines[:6]) + lines[6][:20], encoding="utf-8")
    assert main(_eval_args(tiny_model_dir, eval_data, cut)) == 0
    assert (cut / "predictions.jsonl").read_text() == (full / "predictions.jsonl").read_text()
    assert json.loads((cut / "metrics.json").read_text()) == metrics


def test_killed_eval_resumes_to_the_same_file(tiny_model_dir, eval_data, tmp_path):
    """SIGKILL in the middle of a real run, then the same command again."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(_eval_args(tiny_model_dir, eval_data, reference, "--max-new-tokens", "48", "--batch-size", "2")) == 0
    command = [sys.executable, "-m", "glmtune", *_eval_args(tiny_model_dir, eval_data, killed, "--max-new-tokens", "48",
                                                            "--batch-size", "2")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    predictions = killed / "predictions.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if predictions.exists() and len(predictions.read_bytes().splitlines()) >= 6:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(_rows(predictions)) if predictions.exists() else 0
    assert 0 < written < 40, "the run was not interrupted in the middle; it must be slower than the polling"
    assert main(_eval_args(tiny_model_dir, eval_data, killed, "--max-new-tokens", "48", "--batch-size", "2")) == 0
    expected = [r["prediction"] for r in _rows(reference / "predictions.jsonl")]
    assert [r["prediction"] for r in _rows(predictions)] == expected


def test_eval_refuses_other_settings_in_the_same_folder(tiny_model_dir, eval_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_eval_args(tiny_model_dir, eval_data, out, "--max-samples", "4")) == 0
    assert main(_eval_args(tiny_model_dir, eval_data, out, "--max-samples", "4", "--max-new-tokens", "8")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "max_new_tokens" in err and "Traceback" not in err
    assert main(_eval_args(tiny_model_dir, eval_data, out, "--max-samples", "4", "--max-new-tokens", "8",
                           "--overwrite")) == 0


def test_sampled_eval_is_seeded_and_reproducible(tiny_model_dir, eval_data, tmp_path):
    args = ["--max-samples", "8", "--temperature", "1.0", "--seed", "7"]
    assert main(_eval_args(tiny_model_dir, eval_data, tmp_path / "a", *args)) == 0
    assert main(_eval_args(tiny_model_dir, eval_data, tmp_path / "b", *args)) == 0
    first, second = _rows(tmp_path / "a" / "predictions.jsonl"), _rows(tmp_path / "b" / "predictions.jsonl")
    assert [r["prediction"] for r in first] == [r["prediction"] for r in second]
    assert main(_eval_args(tiny_model_dir, eval_data, tmp_path / "c", "--max-samples", "8", "--temperature", "1.0",
                           "--seed", "8")) == 0
    assert main(_eval_args(tiny_model_dir, eval_data, tmp_path / "greedy", "--max-samples", "8")) == 0
    other_seed = [r["prediction"] for r in _rows(tmp_path / "c" / "predictions.jsonl")]
    greedy = [r["prediction"] for r in _rows(tmp_path / "greedy" / "predictions.jsonl")]
    sampled = [r["prediction"] for r in first]
    assert all(sampled) and all(greedy)  # text was generated, so the comparisons below mean something
    assert other_seed != sampled  # the seed chooses the samples
    assert greedy != sampled  # temperature 1.0 samples; without it decoding is greedy


def test_metrics_command_scores_a_file_and_explains_bad_lines(tmp_path, capsys):
    good = tmp_path / "p.jsonl"
    good.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"target": '["好评"]', "prediction": '["好评"]', "id": 1},
        {"target": '["差评"]', "prediction": "", "id": 2},
    ]) + "\n", encoding="utf-8")
    assert main(["metrics", "--predictions", str(good), "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["samples"] == 2 and metrics["tasks"]["classification"]["accuracy"] == 50.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"target": "a", "prediction": "a"}\n{"target": "a"}\n', encoding="utf-8")
    assert main(["metrics", "--predictions", str(bad)]) == 2
    assert f"{bad}:2: 'prediction' must be a string (missing)" in capsys.readouterr().err


def test_compare_writes_a_report_with_base_and_tuned(trained_run, eval_data, tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--adapter", str(trained_run.adapter_dir), "--data", str(eval_data), "--output", str(out),
                 "--max-samples", "6", "--max-new-tokens", "12"]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "base" in report and "## Examples" in report
    base, tuned = _rows(out / "base" / "predictions.jsonl"), _rows(out / "tuned" / "predictions.jsonl")
    assert len(base) == len(tuned) == 6
    assert [r["prediction"] for r in base] != [r["prediction"] for r in tuned]


def test_training_picks_best_by_an_answer_metric_stops_early_and_reports(tiny_model_dir, small_data, tmp_path,
                                                                         train_tiny, log_values):
    from glmtune.methods.adapter import read_adapter_info

    run = train_tiny(tiny_model_dir, small_data, tmp_path / "run", max_steps=12, eval_steps=2, learning_rate=3e-2,
                     lora_target="all-linear", metric_for_best="rouge-l", early_stopping_patience=2,
                     eval_max_new_tokens=8, eval_generate=True, save_steps=12)
    scores = log_values(run.output_dir, "eval_rouge-l")
    assert scores and len(scores) == len(log_values(run.output_dir, "eval_loss"))
    best = read_adapter_info(run.best_dir)
    assert best["best_metric"] == "rouge-l" and best["best_value"] == max(scores)
    assert (run.output_dir / "report.md").is_file() and (run.output_dir / "tuned" / "metrics.json").is_file()


@pytest.mark.parametrize("metric", ["rouge-l", "eval_loss"])
def test_early_stopping_stops_after_patience_evaluations_without_gain(tiny_model_dir, small_data, tmp_path,
                                                                       train_tiny, log_values, metric):
    """A learning rate too small to change anything: the first evaluation stays the best, so training must
    stop right after `patience` more evaluations, long before max_steps."""
    run = train_tiny(tiny_model_dir, small_data, tmp_path / "run", max_steps=30, eval_steps=1, learning_rate=1e-12,
                     metric_for_best=metric, early_stopping_patience=2, eval_max_new_tokens=4, save_steps=30)
    key = "eval_loss" if metric == "eval_loss" else f"eval_{metric}"
    scores = log_values(run.output_dir, key)
    assert run.metrics["global_step"] == 2  # evaluated at steps 0 (the best), 1 and 2, then stopped
    assert len(scores) == 3 and scores[1:] == [scores[0]] * 2


def test_answer_metric_options_are_checked_before_training(tiny_model_dir, small_data, tmp_path, capsys):
    train, _ = small_data
    assert main(["train", f"model={tiny_model_dir}", f"train_file={train}", f"output_dir={tmp_path / 'o'}",
                 "metric_for_best=bleu-4"]) == 2
    assert "need(s) dev_file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
