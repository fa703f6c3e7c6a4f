"""GenerationOptions is the one declaration of how answers are generated: every command that generates
gets its flags from it, with that command's defaults, and reads them back as one GenerationOptions."""

from __future__ import annotations

import dataclasses

import pytest

from glmtune.cli import build_parser
from glmtune.config import GenerationOptions, generation_from_args

NAMES = [f.name for f in dataclasses.fields(GenerationOptions)]
REQUIRED = {"predict": ["--input", "x", "--output", "y"], "eval": ["--data", "x", "--output", "y"],
            "compare": ["--data", "x", "--output", "y"], "chat": [], "webui": [], "serve": []}


@pytest.mark.parametrize("command, longest", [("predict", 256), ("eval", 256), ("compare", 256), ("chat", 512),
                                              ("webui", 512)])
def test_every_generating_command_takes_every_option_with_its_own_default(command, longest):
    args = build_parser().parse_args([command, *REQUIRED[command]])
    assert generation_from_args(args) == GenerationOptions(max_new_tokens=longest)
    args = build_parser().parse_args([command, *REQUIRED[command], "--max_new_tokens", "7", "--temperature", "0.5",
                                      "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "3"])
    assert generation_from_args(args) == GenerationOptions(7, 0.5, 0.9, 1.1, 3)


def test_serve_sets_only_the_length_of_answers_that_give_none():
    args = build_parser().parse_args(["serve", "--max-new-tokens", "9"])
    assert generation_from_args(args) == GenerationOptions(max_new_tokens=9)
    assert not any(hasattr(args, name) for name in NAMES if name != "max_new_tokens")


@pytest.mark.parametrize("flag, value, message", [("--top-p", "0", "must be greater than 0"),
                                                  ("--max-new-tokens", "0", "must be at least 1"),
                                                  ("--seed", str(2 ** 32), "must be at most 4294967295"),
                                                  ("--temperature", "warm", "expected a number")])
def test_out_of_range_values_are_refused_as_they_are_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", flag, value])
    assert message in capsys.readouterr().err
