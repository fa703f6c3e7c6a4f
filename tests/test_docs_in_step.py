"""The Chinese documentation stays in step with the English: README.zh-CN.md shows the same `glmtune`
commands as README.md, and every docs/X.zh.md has the sections, options and commands of docs/X.md.

Comparing code and option names rather than prose makes the check independent of the language: a section,
command or option added in one language only changes these sets in that file alone."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import re
from pathlib import Path

import pytest

from glmtune.cli import build_parser
from glmtune.config import TrainConfig, section_of

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAIRS = sorted(p.with_suffix("").with_suffix("").name for p in DOCS.glob("*.zh.md"))
# tools/make_option_table.py writes these sections of docs/training.md (English tables) up to the end
GENERATED = ("## Option names from the tutorials\n", "## Options\n")
CHINESE_OPTIONS = "\n## 选项\n"  # training.zh.md's option tables, which the tool writes from the `zh` help texts

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
SPAN = re.compile(r"`([^`\n]+)`")
LEADING_NAME = re.compile(r"[a-z][a-z0-9_]*")
OPTIONS = {f.name for f in dataclasses.fields(TrainConfig)}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def commands(text: str) -> set[str]:
    """Every `glmtune ...` line of the fenced code blocks, continuation lines joined, comments and spacing
    dropped."""
    found = set()
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip().removeprefix("$ ")).strip()
            if line.startswith("glmtune "):
                found.add(" ".join(line.split()))
    return found


def without_code(text: str) -> str:
    return FENCE.sub("", text)


def headings(text: str) -> list[str]:
    return [line for line in without_code(text).splitlines() if line.startswith("## ")]


def flags(text: str) -> set[str]:
    return set(FLAG.findall(text))


def option_names(text: str) -> set[str]:
    """Names in backticks that are options or look like them (snake_case): `quantization_bit: 4` gives
    quantization_bit."""
    names = set()
    for span in SPAN.findall(without_code(text)):
        match = LEADING_NAME.match(span)
        if match and (match.group() in OPTIONS or "_" in match.group()):
            names.add(match.group())
    return names


def before_generated(english: str, chinese: str) -> tuple[str, str]:
    """The hand-written parts. The generated sections at the end of docs/training.md are left out, and as many
    last sections of the Chinese doc: the tutorial-names table stays English there (the doc says so) and the
    option tables are checked against the code by their own test."""
    starts = [english.index(marker) for marker in GENERATED if marker in english]
    if not starts:
        return english, chinese
    cut = min(starts)
    sections = len(headings(english[cut:]))
    chinese_starts = [m.start() for m in re.finditer(r"^## ", without_code_keeping_length(chinese), re.M)]
    return english[:cut], chinese[: chinese_starts[-sections]]


def without_code_keeping_length(text: str) -> str:
    """`text` with its code blocks blanked out, so positions still match."""
    return FENCE.sub(lambda m: " " * len(m.group()), text)


def difference(name_a: str, a: set, name_b: str, b: set) -> str:
    lines = [f"only in {name_a}: {item}" for item in sorted(a - b)]
    lines += [f"only in {name_b}: {item}" for item in sorted(b - a)]
    return "\n".join(lines)


def test_the_readmes_show_the_same_glmtune_commands():
    english, chinese = read(ROOT / "README.md"), read(ROOT / "README.zh-CN.md")
    en, zh = commands(english), commands(chinese)
    assert len(en) > 20, "README.md's commands were not found; has the code-block format changed?"
    assert en == zh, "update README.zh-CN.md (or README.md) so both show the same commands:\n" + difference(
        "README.md", en, "README.zh-CN.md", zh)


def test_the_readmes_start_with_the_same_set_up_and_link_each_other():
    english, chinese = read(ROOT / "README.md"), read(ROOT / "README.zh-CN.md")
    setup = [line.split("#")[0].strip() for line in FENCE.findall(english)[0].splitlines()]
    assert setup == [line.split("#")[0].strip() for line in FENCE.findall(chinese)[0].splitlines()]
    assert "(README.zh-CN.md)" in "\n".join(english.splitlines()[:5])
    assert "(README.md)" in "\n".join(chinese.splitlines()[:5])
    assert flags(english) == flags(chinese), difference("README.md", flags(english), "README.zh-CN.md",
                                                        flags(chinese))
    assert option_names(english) == option_names(chinese), difference(
        "README.md", option_names(english), "README.zh-CN.md", option_names(chinese))


def test_every_chinese_guide_has_an_english_twin():
    assert {"chatglm", "data", "serving", "training"} <= set(PAIRS)
    for name in PAIRS:
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.zh.md has no docs/{name}.md"


@pytest.mark.parametrize("name", PAIRS)
def test_a_guide_and_its_chinese_version_are_in_step(name):
    english, chinese = read(DOCS / f"{name}.md"), read(DOCS / f"{name}.zh.md")
    en_file, zh_file = f"docs/{name}.md", f"docs/{name}.zh.md"
    assert f"({name}.zh.md)" in "\n".join(english.splitlines()[:5]), f"{en_file} must link {zh_file} at its top"
    assert f"({name}.md)" in "\n".join(chinese.splitlines()[:5]), f"{zh_file} must link {en_file} at its top"
    assert len(headings(english)) == len(headings(chinese)), (
        f"{en_file} and {zh_file} have different sections:\n" + "\n".join(headings(english)) + "\n--\n"
        + "\n".join(headings(chinese)))
    english, chinese = before_generated(english, chinese)
    for what, extract in (("commands", commands), ("--options", flags), ("option names", option_names)):
        en, zh = extract(english), extract(chinese)
        assert en == zh, f"{what} differ; translate what changed:\n" + difference(en_file, en, zh_file, zh)


def _option_table_tool():
    """tools/make_option_table.py as a module (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("make_option_table", ROOT / "tools" / "make_option_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_option_has_its_help_in_chinese():
    """Each option's Chinese help is part of its definition: docs/training.zh.md's tables and the web UI show it."""
    for f in dataclasses.fields(TrainConfig):
        zh = f.metadata.get("help_zh")
        assert isinstance(zh, str) and zh.strip(), (
            f"option {f.name} has no Chinese help: add zh=\"...\" to its option(...) in glmtune/config.py, then run "
            "python tools/make_option_table.py --write")
        for text in (f.metadata["help"], zh):  # argparse formats help with %; a | would split the table's row
            assert "%" not in text and "|" not in text and "\n" not in text, f"{f.name}: {text!r}"


def test_the_chinese_option_tables_are_what_the_tool_makes():
    """docs/training.zh.md's option tables are generated from the code, like docs/training.md's: every option of
    each group with its default and its Chinese help (`zh` in glmtune/config.py)."""
    tool = _option_table_tool()
    chinese = read(DOCS / "training.zh.md")
    assert CHINESE_OPTIONS in chinese, "docs/training.zh.md lost its option section (## 选项)"
    assert tool.with_chinese_tables(chinese) == chinese, "run: python tools/make_option_table.py --write"
    tables = chinese[chinese.index(CHINESE_OPTIONS):]
    found = {}
    for block in re.split(r"^### ", tables, flags=re.M)[1:]:
        group = block.split("\n", 1)[0].strip()
        found[group] = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \| ", block, re.M))
    expected = {group: {f.name: str(f.default) for f in fields} for group, fields in section_of(TrainConfig)}
    assert found == expected


def _help(words: list[str]) -> str | None:
    """`glmtune WORDS --help` as printed, or None when WORDS is no command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as ended:
        build_parser().parse_args([*words, "--help"])
    return out.getvalue() if ended.value.code == 0 else None


def _tutorial_names() -> set[str]:
    """The tutorial spellings `glmtune train` reads: the names section of docs/training.md, which
    tools/make_option_table.py writes from glmtune/tutorial_names.py."""
    training = read(DOCS / "training.md")
    if GENERATED[0] not in training:
        return set()
    section = training[training.index(GENERATED[0]): training.index(GENERATED[1])]
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", section))


def test_every_command_shown_in_the_docs_has_those_options():
    """The commands in the READMEs and guides run as shown: each subcommand exists and takes each --option
    (train: also its config options, as --flag or key=value, and the tutorials' names)."""
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} | _tutorial_names()
    helps: dict[tuple[str, ...], str | None] = {}
    wrong = []
    files = [ROOT / "README.md", ROOT / "README.zh-CN.md", *sorted(DOCS.glob("*.md"))]
    for path in files:
        for line in sorted(commands(read(path))):
            words = line.split()
            command = tuple(words[1:3] if words[1] == "data" else words[1:2])
            if command not in helps:
                helps[command] = _help(list(command))
            if helps[command] is None:
                wrong.append(f"{path.name}: {line}: no such command")
                continue
            # every --multi-word option also has a hidden --multi_word spelling (glmtune/cli.py), so the
            # dashed one is looked up in the help text
            known = set(FLAG.findall(helps[command]))
            for flag in FLAG.findall(line):
                name = flag[2:].replace("-", "_")
                if flag.replace("_", "-") in known or flag == "--option":  # --option: a placeholder in usage
                    continue
                if words[1] == "train" and (name in train_names or name.removeprefix("no_") in train_names):
                    continue
                wrong.append(f"{path.name}: {line}: {flag}")
            if words[1] == "train":
                for key in re.findall(r"(?<=\s)([a-z][a-z0-9_]*)=", line):
                    if key not in train_names:
                        wrong.append(f"{path.name}: {line}: {key}=")
    assert not wrong, "\n".join(wrong)
