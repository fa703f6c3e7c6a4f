import json
import subprocess
import sys
from pathlib import Path

from glmtune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_validate_reports_ok_and_problems(write_jsonl, capsys):
    good = write_jsonl([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}])
    assert main(["data", "validate", str(good)]) == 0
    assert "OK, 2 samples (alpaca format, 2 trained answers)" in capsys.readouterr().out
    bad = write_jsonl([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "bad.jsonl")
    assert main(["data", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: missing field 'output'" in err and "Traceback" not in err
    assert main(["data", "validate", str(bad), "--no-answers"]) == 0


def test_split_is_reproducible_and_complete(write_jsonl, tmp_path, capsys):
    rows = [{"context": f"q{i}", "target": f"a{i}"} for i in range(50)]
    source = write_jsonl(rows, "all.jsonl")
    assert main(["data", "split", str(source), "--dev-ratio", "0.2", "--seed", "7",
                 "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["data", "split", str(source), "--dev-ratio", "0.2", "--seed", "7",
                 "--output-dir", str(tmp_path / "b")]) == 0
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    train, dev = read(tmp_path / "a/all.train.jsonl"), read(tmp_path / "a/all.dev.jsonl")
    assert len(dev) == 10 and len(train) == 40
    assert sorted(train + dev, key=lambda r: int(r["context"][1:])) == rows
    assert train == read(tmp_path / "b/all.train.jsonl") and dev == read(tmp_path / "b/all.dev.jsonl")
    assert main(["data", "split", str(source), "--dev-ratio", "0.2", "--seed", "8",
                 "--output-dir", str(tmp_path / "a")]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "split", str(source), "--dev-ratio", "0.2", "--seed", "8",
                 "--output-dir", str(tmp_path / "a"), "--overwrite"]) == 0
    assert read(tmp_path / "a/all.dev.jsonl") != dev  # another seed, another split
    assert main(["data", "split", str(source), "--dev-ratio", "1.5"]) == 2


def test_stats_prints_lengths_cuts_and_suggestions(default_model_dir, sample_files, capsys):
    train, _ = sample_files
    assert main(["data", "stats", str(train), "--max-source-length", "100", "--max-target-length", "100"]) == 0
    out = capsys.readouterr().out
    assert "400 samples" in out and "template chat" in out
    for word in ("prompt", "answer", "total", "p95", "p99", "max_source_length=100, max_target_length=100",
                 "suggested limits", "cut none:"):
        assert word in out
    assert main(["data", "stats", str(train), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["samples"] == 400 and data["prompt"]["max"] >= data["prompt"]["p99"]
    cut_none = data["suggestions"]["cut none"]
    described = f"max_source_length={cut_none['max_source_length']}, max_target_length={cut_none['max_target_length']}"
    assert data["cut_at"][described] == 0


def test_the_shipped_sample_dataset_is_what_the_generator_writes(sample_files):
    result = subprocess.run([sys.executable, str(ROOT / "tools/make_sample_dataset.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    train, dev = sample_files
    train_rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    dev_rows = [json.loads(line) for line in dev.read_text(encoding="utf-8").splitlines()]
    assert len(train_rows) == 400 and len(dev_rows) == 60
    assert not {r["context"] for r in train_rows} & {r["context"] for r in dev_rows}
    assert any(r["target"].startswith("```json") for r in dev_rows) and any(r["target"].startswith("[") for r in dev_rows)
