"""Print the option tables of docs/training.md from glmtune's config dataclasses, and its section on the
tutorials' option names from glmtune/tutorial_names.py.

    python tools/make_option_table.py            # print the option tables
    python tools/make_option_table.py --write    # replace the tables and the names section in docs/training.md

Tests check that docs/training.md holds exactly what this makes, so the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glmtune.config import TrainConfig, section_of
from glmtune.tutorial_names import docs_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "training.md"
MARKER = "## Options\n"
NAMES_MARKER = "## Option names from the tutorials\n"
NAMES_INTRO = """
The option names of the official ChatGLM `ptuning/` scripts, ChatGLM-Efficient-Tuning, LLaMA-Factory, the
ChatGLM3 finetune_demo configs (their `data_config`, `training_args`, `peft_config` and `generation_config`
sections are read as flat options) and `transformers.TrainingArguments` work in a config file, as `key=value`
and as `--flag` (`glmtune train --per_device_train_batch_size 4 --fp16`). Each one read logs a line such as
`reading per_device_train_batch_size as batch_size`. A tutorial name and glmtune's name for the same option
with different values in the same source (one file, or the command line) are an error; across sources the
later one wins as usual. As in the official `ptuning/` scripts, `pre_seq_len` given without `method` (or
`use_lora`, `finetuning_type` ...) trains P-Tuning v2. A `TrainingArguments` JSON is read with `glmtune train FILE.json` or
`glmtune train --train_args_file FILE.json` (the tutorials' spelling; give it instead of a config file, not
with one). Any other name is still an error, with a hint only where the name is a typo of a known one.

"""


def option_tables() -> str:
    lines = []
    for section, group in section_of(TrainConfig):
        lines += ["", f"### {section}", "", "| option | default | meaning |", "| --- | --- | --- |"]
        for f in group:
            meta = f.metadata
            choices = f" One of: {', '.join(map(str, meta['choices']))}." if meta.get("choices") else ""
            lines.append(f"| `{f.name}` | `{f.default}` | {meta['help']}{choices} |")
    return "\n".join(lines) + "\n"


def names_section() -> str:
    """docs/training.md's section on the tutorials' names, from glmtune/tutorial_names.py."""
    return NAMES_MARKER + NAMES_INTRO + docs_table() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the tables in {DOC}")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(option_tables())
        return 0
    text = DOC.read_text(encoding="utf-8")
    start = text.index(NAMES_MARKER) if NAMES_MARKER in text else text.index(MARKER)
    text = text[:start] + names_section() + text[text.index(MARKER):]
    DOC.write_text(text[: text.index(MARKER) + len(MARKER)] + option_tables(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
