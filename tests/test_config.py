import argparse
import json
from dataclasses import fields

import pytest
import yaml

from glmtune.cli import build_parser, main
from glmtune.config import TrainConfig, add_arguments, config_from_args, read_config_file, to_yaml
from glmtune.errors import GlmtuneError


def parse_train(words):
    """What `glmtune train WORDS` resolves to."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(parser, TrainConfig)
    args, unknown = parser.parse_known_args(words)
    flags = [w for w in unknown if w.startswith("-")]
    positional = [w for w in unknown if not w.startswith("-")]
    return config_from_args(TrainConfig, args, positional, flags)


def test_three_spellings_of_one_option_agree(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_steps: 50\n")
    from_file = parse_train([str(config_file)])
    from_flag = parse_train(["--max-steps", "50"])
    from_underscore_flag = parse_train(["--max_steps", "50"])
    from_word = parse_train(["max_steps=50"])
    assert from_file.max_steps == from_flag.max_steps == from_underscore_flag.max_steps == from_word.max_steps == 50
    assert from_file == from_flag == from_word


def test_later_sources_win(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("learning_rate: 0.1\nbatch_size: 3\nlora_rank: 4\n")
    config = parse_train([str(config_file), "batch_size=5", "--lora-rank", "16"])
    assert config.learning_rate == 0.1  # file
    assert config.batch_size == 5  # key=value over file
    assert config.lora_rank == 16  # flag over file


def test_json_config_and_booleans(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"group_by_length": False, "warmup_ratio": 0.1}))
    config = parse_train([str(config_file), "--gradient-checkpointing"])
    assert config.group_by_length is False
    assert config.gradient_checkpointing is True
    assert parse_train(["group_by_length=no"]).group_by_length is False
    assert parse_train(["--no-group-by-length"]).group_by_length is False


@pytest.mark.parametrize("words, suggestion", [
    (["--max-step", "5"], "max_steps"),
    (["learnig_rate=0.1"], "learning_rate"),
    (["--lora-rnak", "4"], "lora_rank"),
])
def test_unknown_keys_name_the_closest_valid_key(words, suggestion):
    with pytest.raises(GlmtuneError, match=f"did you mean '{suggestion}'"):
        parse_train(words)


def test_unknown_key_in_file_names_the_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train_fiel: data.jsonl\n")
    with pytest.raises(GlmtuneError, match=r"run.yaml: unknown option 'train_fiel'; did you mean 'train_file'"):
        parse_train([str(config_file)])


@pytest.mark.parametrize("words, message", [
    (["learning_rate=-1"], "learning_rate must be greater than 0"),
    (["lora_rank=0"], "lora_rank must be at least 1"),
    (["batch_size=two"], "batch_size must be a whole number"),
    (["max_steps=2.5"], "max_steps must be a whole number"),
    (["lr_scheduler=triangle"], "lr_scheduler must be one of linear, cosine, constant"),
    (["warmup_ratio=1.5"], "warmup_ratio must be at most"),
    (["group_by_length=maybe"], "group_by_length must be true or false"),
])
def test_bad_values_are_explained(words, message):
    with pytest.raises(GlmtuneError, match=message):
        parse_train(words)


def test_bad_config_files(tmp_path):
    with pytest.raises(GlmtuneError, match="config file not found"):
        read_config_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_steps: [1, 2\n")
    with pytest.raises(GlmtuneError, match="not valid YAML"):
        read_config_file(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(GlmtuneError, match="must be a mapping"):
        read_config_file(listing)


def test_resolved_config_round_trips(tmp_path):
    config = parse_train(["max_steps=7", "lora_target=q_proj,v_proj", "train_file=a.jsonl"])
    saved = tmp_path / "resolved_config.yaml"
    saved.write_text(to_yaml(config))
    assert set(yaml.safe_load(saved.read_text())) == {f.name for f in fields(TrainConfig)}
    assert parse_train([str(saved)]) == config


def test_train_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f"(default: {f.default})" in text


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["train", "--max-stepz", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glmtune: error:") and "did you mean 'max_steps'" in err
    assert "Traceback" not in err


def test_every_command_has_help():
    parser = build_parser()
    for command in (["train"], ["predict"], ["chat"], ["demo"], ["data", "stats"], ["data", "split"],
                    ["data", "validate"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(command + ["--help"])
        assert exit_info.value.code == 0


def test_docs_list_every_option_as_the_code_defines_it():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tables = subprocess.run([sys.executable, str(root / "tools/make_option_table.py")], capture_output=True,
                            text=True, check=True).stdout
    text = (root / "docs/training.md").read_text(encoding="utf-8")
    assert text.endswith("## Options\n" + tables), "run: python tools/make_option_table.py --write"
    for f in fields(TrainConfig):
        assert f"| `{f.name}` | `{f.default}` |" in tables


def test_every_example_config_is_valid():
    from pathlib import Path

    from glmtune.config import build_config

    root = Path(__file__).resolve().parent.parent
    # accelerate_*.yaml are `accelerate launch` configs (docs/distributed.md), not glmtune's
    examples = sorted(p for p in (root / "examples").glob("*.yaml") if not p.name.startswith("accelerate_"))
    assert examples
    for path in examples:
        config = build_config(TrainConfig, [(str(path), read_config_file(path))])
        assert config.train_file, path
