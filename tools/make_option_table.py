"""Print the option tables of docs/training.md from glmtune's config dataclasses, and its section on the
tutorials' option names from glmtune/tutorial_names.py; the Chinese tables of docs/training.zh.md come from the
same fields' Chinese help (`zh=` in glmtune/config.py).

    python tools/make_option_table.py            # print the option tables
    python tools/make_option_table.py --zh       # print the Chinese option tables
    python tools/make_option_table.py --write    # replace the tables and the names section in docs/training.md,
                                                 # and the option tables in docs/training.zh.md

Tests check that both docs hold exactly what this makes, so the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from glmtune.config import TrainConfig, section_of
from glmtune.tutorial_names import docs_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "training.md"
MARKER = "## Options\n"
ZH_DOC = DOC.with_name("training.zh.md")
ZH_MARKER = "## 选项\n"
ZH_INTRO = """
下面是 `glmtune train` 的全部选项、默认值和中文说明，按 model、data、method、training 四组列出；`glmtune train --help`
也会列出它们。这些表格和英文版 [Options](training.md#options) 的表格一样，由 `tools/make_option_table.py --write`
从代码生成：说明取自 `glmtune/config.py` 中各选项的 `zh` 文本，要改说明请改那里，再运行这个命令。
"""
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


def option_tables(zh: bool = False) -> str:
    """The option tables, one per group; with `zh`, docs/training.zh.md's, from each field's `help_zh`."""
    header = "| 选项 | 默认值 | 说明 |" if zh else "| option | default | meaning |"
    lines = []
    for section, group in section_of(TrainConfig):
        lines += ["", f"### {section}", "", header, "| --- | --- | --- |"]
        for f in group:
            meta = f.metadata
            if zh and not meta.get("help_zh"):
                raise SystemExit(f"{f.name} has no Chinese help: add zh=... to its option() in glmtune/config.py")
            if not meta.get("choices"):
                choices = ""
            elif zh:
                choices = f"可选：{'、'.join(map(str, meta['choices']))}。"
            else:
                choices = f" One of: {', '.join(map(str, meta['choices']))}."
            lines.append(f"| `{f.name}` | `{f.default}` | {meta['help_zh' if zh else 'help']}{choices} |")
    return "\n".join(lines) + "\n"


def chinese_options_section() -> str:
    """docs/training.zh.md's option section: its heading, intro and the Chinese tables."""
    return ZH_MARKER + ZH_INTRO + option_tables(zh=True)


def with_chinese_tables(text: str) -> str:
    """docs/training.zh.md's `text` with its option section made anew; the sections after it stay as they are."""
    start = text.index("\n" + ZH_MARKER) + 1  # not a "### 选项"
    following = re.search(r"^## ", text[start + len(ZH_MARKER):], re.M)
    rest = "\n" + text[start + len(ZH_MARKER) + following.start():] if following else ""
    return text[:start] + chinese_options_section() + rest


def names_section() -> str:
    """docs/training.md's section on the tutorials' names, from glmtune/tutorial_names.py."""
    return NAMES_MARKER + NAMES_INTRO + docs_table() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the tables in {DOC} and {ZH_DOC}")
    parser.add_argument("--zh", action="store_true", help="print the Chinese tables of docs/training.zh.md")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(option_tables(zh=args.zh))
        return 0
    ZH_DOC.write_text(with_chinese_tables(ZH_DOC.read_text(encoding="utf-8")), encoding="utf-8")
    text = DOC.read_text(encoding="utf-8")
    start = text.index(NAMES_MARKER) if NAMES_MARKER in text else text.index(MARKER)
    text = text[:start] + names_section() + text[text.index(MARKER):]
    DOC.write_text(text[: text.index(MARKER) + len(MARKER)] + option_tables(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
