import json

import pytest
import torch

from glmtune.cli import main
from glmtune.data.formats import load_samples
from glmtune.errors import GlmtuneError
from glmtune.config import GenerationOptions
from glmtune.inference.generate import Generator
from glmtune.methods import get_method
from glmtune.methods.adapter import ADAPTER_FILE, load_tuned_model, read_adapter_info
from glmtune.models.loader import LoadedModel, load_model, load_tokenizer


def log_entries(run_dir, key):
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if key in json.loads(line)]


def test_training_lowers_the_loss_and_writes_the_run(trained_run):
    out = trained_run.output_dir
    losses = log_entries(out, "loss")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0  # nats; a random model starts near ln(49152)
    eval_losses = log_entries(out, "eval_loss")
    assert len(eval_losses) == 3  # before training, at step 6, at step 12
    assert eval_losses[-1] < eval_losses[0]
    for name in ("resolved_config.yaml", "train_log.jsonl", "loss.png", "metrics.json", "checkpoint-12"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 12 and metrics["initial_eval_loss"] == eval_losses[0]
    assert metrics["truncation"]["train"]["samples"] == 12


def test_adapter_folder_holds_only_the_adapter_and_describes_itself(trained_run, tiny_model_dir):
    files = sorted(p.name for p in trained_run.adapter_dir.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", ADAPTER_FILE]
    info = read_adapter_info(trained_run.adapter_dir)
    assert info["base_model"] == str(tiny_model_dir) and info["family"] == "generic"
    assert info["method"] == "lora" and info["template"] == "chat"
    assert info["parameters"] == {"rank": 16, "alpha": 32.0, "dropout": 0.0, "target": "all-linear",
                                  "use_rslora": True}  # the defaults
    assert info["base_fingerprint"]["hidden_size"] == 64
    best = read_adapter_info(trained_run.best_dir)
    assert best["eval_loss"] == min(log_entries(trained_run.output_dir, "eval_loss"))


def test_reloaded_adapter_gives_identical_greedy_answers(trained_run, small_data):
    _, dev = small_data
    prompts = [s.prompt_messages for s in load_samples(dev)[0]]
    sampling = GenerationOptions(max_new_tokens=12)
    # The in-memory model right after training, merged the way every loader merges it.
    base = read_adapter_info(trained_run.adapter_dir)["base_model"]
    tokenizer, family, path = load_tokenizer(base)
    in_memory = LoadedModel(get_method("lora").for_inference(trained_run.model).eval(), tokenizer, family, path, base)
    reloaded, info = load_tuned_model(None, trained_run.adapter_dir)  # the adapter folder alone
    assert info["method"] == "lora"
    first = Generator(in_memory, info["template"]).generate(prompts, sampling)
    second = Generator(reloaded, info["template"]).generate(prompts, sampling)
    assert first == second
    assert any(answer for answer in first)
    # left padding: each prompt alone gets the same answer as inside the padded batch
    alone = [Generator(reloaded, info["template"]).generate([p], sampling)[0] for p in prompts]
    assert alone == second


def test_merged_adapter_matches_the_unmerged_one(tiny_model_dir, trained_run):
    from peft import PeftModel

    base = load_model(str(tiny_model_dir)).model
    unmerged = PeftModel.from_pretrained(base, trained_run.adapter_dir).eval()
    ids = torch.tensor([[1, 500, 600, 700, 800]])
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits
        merged = get_method("lora").for_inference(unmerged)(input_ids=ids).logits
    assert torch.allclose(expected, merged, atol=1e-5)
    assert not torch.allclose(load_model(str(tiny_model_dir)).model(input_ids=ids).logits, expected, atol=1e-3)


def test_an_earlier_run_is_never_overwritten_silently(tmp_path, tiny_model_dir, small_data, capsys):
    train, _ = small_data
    args = ["train", f"model={tiny_model_dir}", f"train_file={train}", f"output_dir={tmp_path / 'run'}",
            "max_steps=2", "save_steps=2", "batch_size=4"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(args + ["--overwrite"]) == 0
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only glmtune's files are replaced
    assert main(args + ["max_steps=4", "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == 4
    assert main(["train", f"model={tiny_model_dir}", f"train_file={train}", f"output_dir={tmp_path / 'fresh'}",
                 "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_data_fails_before_the_model_is_loaded(tmp_path, write_jsonl, capsys):
    bad = write_jsonl([{"context": "q", "target": "a"}, {"context": "q"}])
    assert main(["train", "model=/nonexistent/model", f"train_file={bad}", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: missing field 'target'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["train", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "train_file is required" in capsys.readouterr().err


def test_adapter_refuses_another_base(trained_run, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(GlmtuneError, match="does not match"):
        load_tuned_model(str(tmp_path / "other"), trained_run.adapter_dir)
    with pytest.raises(GlmtuneError, match="not a glmtune adapter"):
        load_tuned_model(None, tmp_path)


def test_same_seed_same_adapter_and_checkpointing_changes_nothing(tmp_path, tiny_model_dir, small_data):
    from safetensors.torch import load_file

    train, _ = small_data
    common = ["train", f"model={tiny_model_dir}", f"train_file={train}", "max_steps=3", "batch_size=4",
              "lora_dropout=0", "logging_steps=1", "save_steps=3", "learning_rate=1e-2"]
    assert main(common + [f"output_dir={tmp_path / 'a'}"]) == 0
    assert main(common + [f"output_dir={tmp_path / 'b'}"]) == 0
    assert main(common + [f"output_dir={tmp_path / 'c'}", "--gradient-checkpointing"]) == 0
    weights = [load_file(tmp_path / run / "adapter/adapter_model.safetensors") for run in "abc"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert all(torch.allclose(weights[0][k], weights[2][k], atol=1e-5) for k in weights[0])
    assert log_entries(tmp_path / "a", "loss") == pytest.approx(log_entries(tmp_path / "c", "loss"), abs=1e-4)


def test_a_failed_load_leaves_nothing_behind(tmp_path, small_data, capsys):
    train, _ = small_data
    out = tmp_path / "run"
    assert main(["train", f"train_file={train}", f"output_dir={out}", f"model={tmp_path / 'missing'}"]) == 2
    assert not out.exists()
    assert "neither a local checkpoint folder" in capsys.readouterr().err


def test_a_missing_logging_backend_is_reported_up_front(tmp_path, small_data, capsys):
    import importlib.util

    if importlib.util.find_spec("mlflow"):
        pytest.skip("mlflow is installed here")
    train, _ = small_data
    assert main(["train", f"train_file={train}", f"output_dir={tmp_path / 'run'}", "report_to=mlflow"]) == 2
    assert "needs the mlflow package" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_tensorboard_logging_writes_the_losses(tiny_model_dir, small_data, tmp_path, train_tiny):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_tiny(tiny_model_dir, small_data, tmp_path / "run", max_steps=3, save_steps=3, report_to="tensorboard")
    events = sorted((run.output_dir / "runs").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert len(accumulator.Scalars("train/loss")) == 3
    assert accumulator.Scalars("eval/loss")


def test_resolved_config_records_the_values_the_run_used(tiny_model_dir, small_data, tmp_path, train_tiny):
    """Defaults worked out from other options (the method's learning rate, auto dtype/precision/template, the
    prefix MLP's width) are written as the values used, and the file trains the same run again."""
    import yaml

    from glmtune.config import TrainConfig, read_config_file

    run = train_tiny(tiny_model_dir, (small_data[0], None), tmp_path / "out", max_steps=1, method="ptuning",
                     pre_seq_len=4, prefix_projection=True)
    resolved = yaml.safe_load((run.output_dir / "resolved_config.yaml").read_text())
    assert resolved["learning_rate"] == 5e-2  # P-Tuning's default for a small model; the run was not given one
    assert (resolved["dtype"], resolved["precision"], resolved["template"]) == ("float32", "fp32", "chat")
    assert resolved["prefix_hidden_size"] == 64  # the tiny model's hidden size
    assert resolved["quantization_bit"] == 0 and resolved["output_dir"] == str(run.output_dir)
    assert None not in (resolved["learning_rate"], resolved["prefix_hidden_size"])
    assert TrainConfig(**read_config_file(run.output_dir / "resolved_config.yaml"))  # a valid config again


def test_resolved_config_names_the_lora_modules_auto_chose(tiny_model_dir, small_data, tmp_path, train_tiny):
    import yaml

    run = train_tiny(tiny_model_dir, (small_data[0], None), tmp_path / "out", max_steps=1, lora_target="auto")
    resolved = yaml.safe_load((run.output_dir / "resolved_config.yaml").read_text())
    assert resolved["learning_rate"] == 2e-3  # LoRA's default for a model this small (train/size_defaults.py)
    assert set(resolved["lora_target"].split(",")) == {"q_proj", "v_proj"}  # peft's choice for a Llama model
