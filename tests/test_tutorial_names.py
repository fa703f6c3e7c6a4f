"""The option names of the ChatGLM tutorials and transformers' TrainingArguments, read as glmtune's options:
through a config file, key=value and --flag; a TrainingArguments JSON read whole; right hints for the rest;
--snake_case flags on every command; and the options added for them (warmup_steps, save_strategy, optim)
taking effect in a real run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glmtune.cli import build_parser, main
from glmtune.config import TrainConfig, build_config, config_from_args, fields
from glmtune.errors import GlmtuneError
from glmtune.tutorial_names import NAMES, SAME_NAMES

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = [f.name for f in fields(TrainConfig)]

# name: (value in a file, value on the command line, glmtune option, the value it must get)
MAPPED = {
    "per_device_train_batch_size": (3, "3", "batch_size", 3),
    "per_device_eval_batch_size": (5, "5", "eval_batch_size", 5),
    "max_input_length": (64, "64", "max_source_length", 64),
    "max_source_seq_len": (64, "64", "max_source_length", 64),
    "max_src_len": (64, "64", "max_source_length", 64),
    "max_output_length": (32, "32", "max_target_length", 32),
    "max_target_seq_len": (32, "32", "max_target_length", 32),
    "max_tgt_len": (32, "32", "max_target_length", 32),
    "max_seq_length": (300, "300", "cutoff_len", 300),
    "max_seq_len": (300, "300", "cutoff_len", 300),
    "max_len": (300, "300", "cutoff_len", 300),
    "model_name_or_path": ("models/chatglm-6b", "models/chatglm-6b", "model", "models/chatglm-6b"),
    "train_path": ("t.jsonl", "t.jsonl", "train_file", "t.jsonl"),
    "data_path": ("t.jsonl", "t.jsonl", "train_file", "t.jsonl"),
    "validation_file": ("d.jsonl", "d.jsonl", "dev_file", "d.jsonl"),
    "val_file": ("d.jsonl", "d.jsonl", "dev_file", "d.jsonl"),
    "dev_path": ("d.jsonl", "d.jsonl", "dev_file", "d.jsonl"),
    "max_samples": (10, "10", "max_train_samples", 10),
    "max_new_tokens": (64, "64", "eval_max_new_tokens", 64),
    "template_name": ("chatglm3", "chatglm3", "template", "chatglm3"),
    "use_lora": (True, "true", "method", "lora"),
    "use_ptuning": (True, "true", "method", "ptuning"),
    "finetuning_type": ("p_tuning", "p_tuning", "method", "ptuning"),
    "train_mode": ("qlora", "qlora", "method", "qlora"),
    "peft_type": ("PREFIX_TUNING", "PREFIX_TUNING", "method", "ptuning"),
    "lora_r": (16, "16", "lora_rank", 16),
    "r": (16, "16", "lora_rank", 16),
    "target_modules": (["q_proj", "v_proj"], ["q_proj", "v_proj"], "lora_target", "q_proj,v_proj"),
    "lora_target_modules": (["q_proj", "v_proj"], ["q_proj", "v_proj"], "lora_target", "q_proj,v_proj"),
    "lora_target": (["q_proj", "v_proj"], "q_proj,v_proj", "lora_target", "q_proj,v_proj"),
    "num_virtual_tokens": (64, "64", "pre_seq_len", 64),
    "fp16": (True, "true", "precision", "fp16"),
    "bf16": (True, "true", "precision", "bf16"),
    "load_in_8bit": (True, "true", "quantization_bit", 8),
    "load_in_4bit": (True, "true", "quantization_bit", 4),
    "epochs": (2, "2", "num_train_epochs", 2.0),
    "num_epochs": (2, "2", "num_train_epochs", 2.0),
    "lr": (1e-3, "1e-3", "learning_rate", 1e-3),
    "lr_scheduler_type": ("linear", "linear", "lr_scheduler", "linear"),
    "save_freq": (50, "50", "save_steps", 50),
    "overwrite_output_dir": (True, "true", "overwrite", True),
    "report_to": (["tensorboard"], "tensorboard", "report_to", "tensorboard"),
    "optim": ("adamw_hf", "adamw_hf", "optim", "adamw_torch"),
    "evaluation_strategy": ("no", "no", "eval_each_epoch", False),
    "eval_strategy": ("no", "no", "eval_each_epoch", False),
    "pissa_init": (True, "true", "lora_init", "pissa"),
    "mask_history": (True, "true", "train_on", "last_assistant"),
    "init_lora_weights": ("olora", "olora", "lora_init", "olora"),
}
# Accepted and ignored, with a note saying what glmtune does instead
NOTED = ["do_train", "do_eval", "do_predict", "test_file", "predict_with_generate", "remove_unused_columns",
         "ddp_find_unused_parameters", "local_rank", "logging_dir", "logging_strategy", "logging_first_step",
         "log_level", "disable_tqdm", "plot_loss", "overwrite_cache", "preprocessing_num_workers", "num_proc",
         "pad_to_max_length", "ignore_pad_token_for_loss", "val_max_target_length", "use_fast_tokenizer",
         "cache_dir", "task_type", "stage", "device", "half_precision_backend", "save_safetensors"]
# Refused, with a pointer to what to use
REFUSED = {"dataset": "train_file", "dataset_dir": "train_file", "val_size": "glmtune data split",
           "dev_ratio": "glmtune data split", "ptuning_checkpoint": "--adapter", "checkpoint_dir": "--adapter",
           "resume_from_checkpoint": "resume: true", "train_args_file": "--train_args_file FILE.json"}
NOTED_VALUES = {"local_rank": "0", "logging_dir": "logs", "logging_strategy": "steps", "log_level": "info",
                "test_file": "t.jsonl", "preprocessing_num_workers": "4", "num_proc": "4",
                "val_max_target_length": "64", "cache_dir": "cache", "task_type": "CAUSAL_LM", "stage": "sft",
                "device": "cuda", "half_precision_backend": "auto", "ddp_find_unused_parameters": "false",
                "remove_unused_columns": "false"}


def test_the_table_covers_every_name():
    assert set(MAPPED) | set(NOTED) | set(REFUSED) == set(NAMES)
    for name, (_, _, option, _) in MAPPED.items():
        assert NAMES[name].option == option
    assert set(SAME_NAMES) <= set(OPTIONS)


def _from_command_line(words: list[str]) -> TrainConfig:
    """What `glmtune train WORDS` reads (as _cmd_train does), without training."""
    args, unknown = build_parser().parse_known_args(["train", *words])
    return config_from_args(TrainConfig, args, [w for w in unknown if not w.startswith("-")],
                            [w for w in unknown if w.startswith("-")])


def _cli_words(name: str, value) -> list[str]:
    return [f"--{name}", *value] if isinstance(value, list) else [f"--{name}", value]


@pytest.mark.parametrize("name", sorted(MAPPED))
def test_a_tutorial_name_is_read_as_glmtunes_option_everywhere(name, tmp_path, caplog):
    file_value, cli_value, option, expected = MAPPED[name]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({name: file_value}), encoding="utf-8")
    json_path = tmp_path / "config.json"
    json_path.write_text(json.dumps({name: file_value}), encoding="utf-8")
    caplog.set_level("INFO")
    readings = {"yaml file": _from_command_line([str(path)]), "json file": _from_command_line([str(json_path)]),
                "--flag": _from_command_line(_cli_words(name, cli_value)),
                "--dashed-flag": _from_command_line(_cli_words(name.replace("_", "-"), cli_value))}
    if not isinstance(cli_value, list):
        readings["key=value"] = _from_command_line([f"{name}={cli_value}"])
    for source, config in readings.items():
        assert getattr(config, option) == expected, source
    if name != option:
        assert f"reading {name}" in caplog.text and option in caplog.text


@pytest.mark.parametrize("name", ["fp16", "bf16", "use_lora", "use_ptuning", "load_in_8bit", "overwrite_output_dir", "pissa_init"])
def test_switches_stand_alone_on_the_command_line_and_false_sets_nothing(name):
    _, _, option, expected = MAPPED[name]
    assert getattr(_from_command_line([f"--{name}", "--max_steps", "3"]), option) == expected
    assert getattr(_from_command_line([f"--{name}", "false"]), option) == getattr(TrainConfig(), option)
    assert getattr(_from_command_line([f"{name}=no"]), option) == getattr(TrainConfig(), option)
    with pytest.raises(GlmtuneError, match=f"{name} 'run.yaml': must be true or false"):
        _from_command_line([f"--{name}", "run.yaml"])  # a word after it is its value: never a config file lost
    with pytest.raises(GlmtuneError, match="do_train 'run.yaml': must be true or false"):
        _from_command_line(["--do_train", "run.yaml"])


@pytest.mark.parametrize("name", NOTED)
def test_names_glmtune_decides_itself_are_accepted_with_a_note(name, tmp_path, caplog):
    caplog.set_level("INFO")
    value = NOTED_VALUES.get(name, "true")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({name: value, "max_steps": 3}), encoding="utf-8")
    defaults = TrainConfig(max_steps=3)
    assert _from_command_line([str(path)]) == defaults
    assert _from_command_line([f"{name}={value}", "max_steps=3"]) == defaults
    assert _from_command_line([f"--{name}", value, "--max_steps", "3"]) == defaults
    assert f"ignoring {name}: {NAMES[name].note}" in caplog.text


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_names_glmtune_cannot_honour_are_refused_with_a_pointer(name, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({name: "x"}), encoding="utf-8")
    with pytest.raises(GlmtuneError, match=f"{name} is not a glmtune option; .*{re.escape(REFUSED[name])}"):
        _from_command_line([str(path)])


def test_full_fine_tuning_and_bad_values_are_clear_errors():
    with pytest.raises(GlmtuneError, match="finetuning_type 'full': not supported; glmtune trains LoRA"):
        build_config(TrainConfig, [("c.yaml", {"finetuning_type": "full"})])
    with pytest.raises(GlmtuneError, match="fp16 'maybe': must be true or false"):
        build_config(TrainConfig, [("c.yaml", {"fp16": "maybe"})])
    with pytest.raises(GlmtuneError, match="report_to \\['wandb', 'tensorboard'\\]: lists several backends"):
        build_config(TrainConfig, [("c.yaml", {"report_to": ["wandb", "tensorboard"]})])
    with pytest.raises(GlmtuneError, match="lr_scheduler must be one of linear, cosine, constant"):
        build_config(TrainConfig, [("c.yaml", {"lr_scheduler_type": "polynomial"})])


def test_a_name_and_glmtunes_name_with_different_values_conflict():
    with pytest.raises(GlmtuneError, match="per_device_train_batch_size and batch_size both set batch_size, to 2 and 4"):
        build_config(TrainConfig, [("c.json", {"per_device_train_batch_size": 2, "batch_size": 4})])
    with pytest.raises(GlmtuneError, match="fp16 and bf16 both set precision"):
        build_config(TrainConfig, [("c.json", {"fp16": True, "bf16": True})])
    with pytest.raises(GlmtuneError, match="command line: .*both set batch_size"):
        _from_command_line(["--per_device_train_batch_size", "2", "--batch-size", "4"])
    # the same value twice is fine, and a later source still wins over an earlier one
    assert build_config(TrainConfig, [("c.json", {"per_device_train_batch_size": 2, "batch_size": 2})]).batch_size == 2
    later = build_config(TrainConfig, [("c.json", {"per_device_train_batch_size": 2}), ("command line", {"batch_size": "8"})])
    assert later.batch_size == 8


def test_chatglm3_finetune_demo_sections_are_read_as_flat_options():
    config = build_config(TrainConfig, [("lora.yaml", {
        "data_config": {"train_file": "train.json", "val_file": "dev.json", "test_file": "dev.json", "num_proc": 16},
        "max_input_length": 256, "max_output_length": 512,
        "training_args": {"output_dir": "./output", "max_steps": 3000, "learning_rate": "5e-5",
                          "per_device_train_batch_size": 4, "dataloader_num_workers": 16,
                          "remove_unused_columns": False, "save_strategy": "steps", "save_steps": 500,
                          "log_level": "info", "logging_strategy": "steps", "logging_steps": 10,
                          "per_device_eval_batch_size": 16, "evaluation_strategy": "steps", "eval_steps": 500,
                          "predict_with_generate": True, "generation_config": {"max_new_tokens": 512}},
        "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1}})])
    assert (config.train_file, config.dev_file, config.max_source_length, config.max_target_length) == \
        ("train.json", "dev.json", 256, 512)
    assert (config.output_dir, config.max_steps, config.learning_rate, config.batch_size, config.eval_batch_size) == \
        ("./output", 3000, 5e-5, 4, 16)
    assert (config.save_steps, config.logging_steps, config.eval_steps, config.eval_max_new_tokens) == (500, 10, 500, 512)
    assert (config.method, config.lora_rank, config.lora_alpha, config.lora_dropout) == ("lora", 8, 32.0, 0.1)


def test_the_official_ptuning_train_sh_reads_as_typed():
    """ChatGLM-6B ptuning/train.sh's arguments, `python3 main.py` replaced by `glmtune train`: P-Tuning v2, as
    there (pre_seq_len without method), with every other value where the script means it."""
    words = ("--do_train --train_file AdvertiseGen/train.json --validation_file AdvertiseGen/dev.json "
             "--prompt_column content --response_column summary --overwrite_cache --model_name_or_path chatglm-6b "
             "--output_dir output/adgen-chatglm-6b-pt-128-2e-2 --overwrite_output_dir --max_source_length 64 "
             "--max_target_length 64 --per_device_train_batch_size 1 --per_device_eval_batch_size 1 "
             "--gradient_accumulation_steps 16 --predict_with_generate --max_steps 3000 --logging_steps 10 "
             "--save_steps 1000 --learning_rate 2e-2 --pre_seq_len 128 --quantization_bit 4 "
             "--preprocessing_num_workers 10").split()
    assert _from_command_line(words) == TrainConfig(
        train_file="AdvertiseGen/train.json", dev_file="AdvertiseGen/dev.json", prompt_column="content",
        response_column="summary", model="chatglm-6b", output_dir="output/adgen-chatglm-6b-pt-128-2e-2",
        overwrite=True, max_source_length=64, max_target_length=64, batch_size=1, eval_batch_size=1,
        gradient_accumulation_steps=16, max_steps=3000, logging_steps=10, save_steps=1000, learning_rate=2e-2,
        pre_seq_len=128, quantization_bit=4, method="ptuning")
    assert _from_command_line(["--pre_seq_len", "64", "--method", "lora"]).method == "lora"
    assert _from_command_line(["--pre_seq_len", "64", "--use_lora"]).method == "lora"


# ---------------------------------------------------------------------------------------------------------
# Unknown names: still errors, and a hint only when it is right

HINTS = {
    "per_device_train_batch_sze": "did you mean 'per_device_train_batch_size' (read as batch_size)?",
    "max_input_len": "did you mean 'max_input_length' (read as max_source_length)?",
    "max_step": "did you mean 'max_steps'?",
    "lora_rnak": "did you mean 'lora_rank'?",
    "epoch": "did you mean 'epochs' (read as num_train_epochs)?",
    "adam_beta1": "it is a transformers TrainingArguments option that glmtune does not take",
    "push_to_hub": "it is a transformers TrainingArguments option that glmtune does not take",
    "train_batch_size": "valid keys: batch_size,",
    "lrr": "valid keys: batch_size,",
    "quantize": "valid keys: batch_size,",
}


@pytest.mark.parametrize("key", sorted(HINTS))
def test_unknown_names_stay_errors_with_a_right_hint(key, tmp_path):
    with pytest.raises(GlmtuneError, match=re.escape(f"unknown option '{key}'; " + HINTS[key])):
        build_config(TrainConfig, [("c.yaml", {key: 1})])
    with pytest.raises(GlmtuneError, match=re.escape(f"command line: unknown option '--{key}'; " + HINTS[key])):
        _from_command_line([f"--{key}", "1"])


def test_no_hint_names_another_option_than_the_one_mistyped():
    """Every one-letter slip (dropped or swapped) of the names the issue lists: the hint, if any, is that name."""
    from glmtune.tutorial_names import hint

    names = ["per_device_train_batch_size", "max_input_length", "max_source_seq_len", "max_output_length",
             "model_name_or_path", "train_path", "data_path", "target_modules", "load_in_8bit", "use_ptuning",
             "lr_scheduler_type", "save_freq", "max_source_length", "learning_rate", "num_train_epochs"]
    for name in names:
        for i in range(len(name) - 1):
            for typo in (name[:i] + name[i + 1:], name[:i] + name[i + 1] + name[i] + name[i + 2:]):
                if typo in NAMES or typo in OPTIONS or typo == name:
                    continue
                said = hint(typo, OPTIONS)
                assert "did you mean" not in said or f"'{name}'" in said, (typo, said)


# ---------------------------------------------------------------------------------------------------------
# A TrainingArguments JSON, read whole, and the options added for it taking effect


def _training_arguments_json(tmp_path, model_dir, train_file, **changes) -> Path:
    data = {"model_name_or_path": str(model_dir), "train_file": str(train_file),
            "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
            "learning_rate": 0.01, "num_train_epochs": 1, "max_steps": 3, "logging_steps": 1, "save_steps": 1,
            "save_strategy": "no", "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "warmup_steps": 2,
            "fp16": False, "optim": "adafactor", "remove_unused_columns": False, "report_to": "none",
            "do_train": True, "overwrite_output_dir": True, "max_source_length": 48, "max_target_length": 24,
            "seed": 7}
    data.update(changes)
    path = tmp_path / "train_args.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def test_a_training_arguments_json_is_read_whole(tmp_path):
    path = _training_arguments_json(tmp_path, "some/model", "t.jsonl")
    for words in ([str(path)], ["--train_args_file", str(path)], ["--train-args-file", str(path)]):
        config = _from_command_line(words)
        assert config == TrainConfig(
            model="some/model", train_file="t.jsonl", output_dir=str(tmp_path / "out"), batch_size=2,
            gradient_accumulation_steps=2, learning_rate=0.01, num_train_epochs=1.0, max_steps=3, logging_steps=1,
            save_steps=1, save_strategy="no", lr_scheduler="linear", warmup_ratio=0.0, warmup_steps=2,
            optim="adafactor", report_to="none", overwrite=True, max_source_length=48, max_target_length=24, seed=7)
    assert _from_command_line(["--train_args_file", str(path), "max_steps=5", "--seed", "3"]).max_steps == 5
    with pytest.raises(GlmtuneError, match="give one config file"):
        _from_command_line([str(path), "--train_args_file", str(path)])


def test_a_training_arguments_json_trains_as_it_says(tmp_path, tiny_model_dir, small_data, monkeypatch, capsys,
                                                     log_values):
    """save_strategy no: no checkpoint folder, but the adapter; warmup_steps 2: the learning rate climbs over two
    steps; optim adafactor: the Trainer's optimizer is Adafactor. Run as typed, through the command line."""
    from glmtune.train.loss import LabelledLossTrainer

    optimizers = []
    create = LabelledLossTrainer.create_optimizer

    def spy(self, *args, **kwargs):
        optimizer = create(self, *args, **kwargs)
        optimizers.append(f"{type(self.optimizer).__module__.split('.')[0]}.{type(self.optimizer).__name__}")
        return optimizer

    monkeypatch.setattr(LabelledLossTrainer, "create_optimizer", spy)
    path = _training_arguments_json(tmp_path, tiny_model_dir, small_data[0])
    assert main(["train", "--train_args_file", str(path)]) == 0
    err = capsys.readouterr().err
    assert "reading per_device_train_batch_size as batch_size" in err
    assert "ignoring remove_unused_columns: glmtune builds the model inputs itself" in err
    out = tmp_path / "out"
    assert (out / "adapter").is_dir()
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".checkpoint*"))
    assert optimizers == ["transformers.Adafactor"]
    rates = log_values(out, "learning_rate")
    assert rates == pytest.approx([0.0, 0.005, 0.01])  # each step's rate: a linear warmup over 2 steps


def test_an_8bit_optimizer_comes_from_bitsandbytes(tmp_path):
    import torch
    from transformers import Trainer

    from glmtune.train.recipe import training_arguments

    args = training_arguments(TrainConfig(optim="adamw_8bit"), tmp_path / "out", False)
    optimizer = Trainer(model=torch.nn.Linear(4, 4), args=args).create_optimizer()
    assert type(optimizer).__module__.startswith("bitsandbytes.") and optimizer.args.optim_bits == 8


def test_optimizer_and_warmup_mistakes_are_one_line_errors(tmp_path, small_data, monkeypatch, capsys):
    train = str(small_data[0])
    out = tmp_path / "out"
    assert main(["train", f"train_file={train}", f"output_dir={out}", "warmup_steps=2", "warmup_ratio=0.1"]) == 2
    assert "glmtune: error: warmup_steps (2) and warmup_ratio (0.1) are both set; give one of them" in \
        capsys.readouterr().err
    import glmtune.models.kbit as kbit

    def missing():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(kbit, "import_bitsandbytes", missing)
    assert main(["train", f"train_file={train}", f"output_dir={out}", "--optim", "paged_adamw_8bit"]) == 2
    assert "glmtune: error: optim paged_adamw_8bit needs bitsandbytes" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# --snake_case flags on every command

REQUIRED = {"predict": ["--input", "i.jsonl", "--output", "o.jsonl"], "eval": ["--data", "d", "--output", "o"],
            "compare": ["--data", "d", "--output", "o"], "metrics": ["--predictions", "p"],
            "export": ["--adapter", "a", "--output", "o"], "data validate": ["f"], "data stats": ["f"],
            "data split": ["f"], "chat": [], "serve": [], "webui": [], "demo": [], "bench": [], "train": []}
VALUES = ["1", "auto", "float16", "x", "0.5"]


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_multi_word_flag_has_a_snake_case_spelling(command, capsys):
    words = command.split()
    with pytest.raises(SystemExit):
        build_parser().parse_args([*words, "--help"])
    text = capsys.readouterr().out
    flags = set(re.findall(r"(?<![\w-])(--[a-z0-9]+(?:-[a-z0-9]+)+)(?=[ ,\n])", text))
    flags -= {f for f in flags if f.startswith("--no-") and "--" + f[5:] in flags}  # --no-x of --x is argparse's
    assert flags or command == "metrics", text  # metrics has only one-word flags
    parser = build_parser()
    for flag in sorted(flags):
        values = [None, *VALUES]
        for value in values:
            extra = [flag] if value is None else [flag, value]
            try:
                dashed = parser.parse_known_args([*words, *REQUIRED[command], *extra])
            except SystemExit:  # a flag with choices names them: try the first
                choice = re.search(r"choose from '?([^',)]+)", capsys.readouterr().err)
                if choice and choice.group(1) not in values:
                    values.append(choice.group(1))
                continue
            if dashed[1]:
                continue
            snake = "--" + flag[2:].replace("-", "_")
            underscored = parser.parse_known_args([*words, *REQUIRED[command], snake, *extra[1:]])
            assert underscored == dashed, flag
            break
        else:
            pytest.fail(f"{command} {flag}: no value tried parses")
    capsys.readouterr()


def test_a_snake_case_flag_runs_a_real_command(tmp_path, write_jsonl, capsys):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    data = write_jsonl(rows)
    assert main(["data", "split", str(data), "--dev_ratio", "0.3", "--output_dir", str(tmp_path / "split")]) == 0
    assert "3 rows ->" in capsys.readouterr().out
    assert len(list((tmp_path / "split").iterdir())) == 2


def test_the_docs_list_the_names_as_the_table_says():
    proc = subprocess.run([sys.executable, "-c", "import make_option_table as m; print(m.names_section(), end='')"],
                          capture_output=True, text=True, cwd=ROOT / "tools", check=True)  # tools/ is no package
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert proc.stdout in text, "run: python tools/make_option_table.py --write"
    assert text.index(proc.stdout) < text.index("## Options\n")
