"""Read JSON / JSONL datasets into conversations, validating every row before any model is loaded.

Accepted row shapes (detected from the first row, then required of every row):

- ``context`` / ``target`` (the ChatGLM tutorials' format)
- ``instruction`` / ``input`` / ``output`` (Alpaca; ``input`` optional, ``system`` optional)
- ``prompt`` / ``response`` (the ChatGLM2 fine-tuning scripts' format)
- any two columns named by ``prompt_column`` / ``response_column`` (e.g. ADGEN's ``content`` / ``summary``)
- ``conversations`` or ``messages``: a list of ``{role, content}`` (or ShareGPT's ``{from, value}``)

With ``prompt_template`` (glmtune.data.prompt_template) the user message of a single-turn row is the template
filled with the row's fields instead of its prompt column; the answer still comes from the answer column,
and ``history`` questions stay as written (the template makes the row's own, last, question).

The single-turn shapes may carry ``history``: a list of ``[question, answer]`` pairs that become the
earlier turns of the conversation. History answers are context only; every assistant message of a
``conversations`` / ``messages`` row is trained.

Problems are collected for the whole file and reported together as ``file:line: problem``; nothing is
skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmtune.data.messages import Message, check_conversation, check_tools, read_turn
from glmtune.data.prompt_template import fill_row, template_fields
from glmtune.errors import GlmtuneError, shown
from glmtune.files import NestingError, check_input_file, loads, path_error, raw_decode

MAX_REPORTED_PROBLEMS = 20

@dataclass
class Sample:
    """One conversation. For training it ends with an assistant message; for prediction it may end with
    the user's message (no reference answer)."""

    messages: list[Message]
    row: dict[str, Any] = field(repr=False)
    where: str = ""  # "file:line", for messages
    tools: list[dict] | None = None  # the functions the assistant may call, as the data gives them

    @property
    def has_answer(self) -> bool:
        return self.messages[-1].role == "assistant"

    @property
    def prompt_messages(self) -> list[Message]:
        """The conversation up to the last user message: what a model is asked."""
        return self.messages[:-1] if self.has_answer else list(self.messages)

    @property
    def reference(self) -> str | None:
        return self.messages[-1].reference_text() if self.has_answer else None


@dataclass(frozen=True)
class RowFormat:
    name: str
    prompt: str | None = None  # column names for the single-turn shapes
    response: str | None = None
    conversation: str | None = None  # column name for the multi-turn shapes


def detect_format(row: dict[str, Any], prompt_column: str | None = None,
                  response_column: str | None = None, prompt_template: str | None = None) -> RowFormat:
    """The row shape, from explicit columns or from the first row's keys."""
    if prompt_template and response_column and not prompt_column:  # the template writes the prompt
        return RowFormat("columns", None, response_column)
    if prompt_column or response_column:
        if not (prompt_column and response_column):
            raise GlmtuneError("give both prompt_column and response_column, or neither")
        return RowFormat("columns", prompt_column, response_column)
    for key in ("conversations", "messages"):
        if key in row:
            return RowFormat(key, conversation=key)
    if "instruction" in row:
        return RowFormat("alpaca", "instruction", "output")
    for prompt, response in (("context", "target"), ("prompt", "response")):
        if prompt in row or response in row:
            return RowFormat(f"{prompt}/{response}", prompt, response)
    raise GlmtuneError(
        f"cannot tell the format from the keys {shown(sorted(row), 200)}; expected context/target, "
        "instruction/input/output, prompt/response, conversations or messages, or name the columns with "
        "--prompt-column and --response-column")


class _Problems:
    """Collects `file:line: problem` lines and raises them together."""

    def __init__(self, path: Path):
        self.path, self.items, self.count = path, [], 0

    def add(self, line: int, problem: str) -> None:
        self.count += 1
        if len(self.items) < MAX_REPORTED_PROBLEMS:
            self.items.append(f"{self.path}:{line}: {problem}")

    def raise_if_any(self) -> None:
        """One line per problem, and with several a last line that counts them (the CLI starts every line
        with `glmtune: error:`, so the last line on the terminal says how many there are)."""
        if self.count == 1:  # one problem: one line, file:line first
            raise GlmtuneError(self.items[0])
        if self.count:
            listed = (f"the first {len(self.items)} listed above" if self.count > len(self.items)
                      else "listed above")
            raise GlmtuneError("\n".join(self.items) + f"\n{self.path}: {self.count} problems in the data ({listed})")


def _decode_lines(path: Path, raw: bytes, problems: _Problems) -> list[str]:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.add(number, f"not valid UTF-8 (byte 0x{chunk[e.start]:02x} at column {e.start + 1})")
            lines.append("")
    return lines


def _read(path: Path, problems: _Problems) -> list[tuple[int, Any]]:
    """Records that parse; lines that do not are added to `problems` (a broken JSON array stops early)."""
    check_input_file(path, "data file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise path_error(path, e, "cannot read") from None
    lines = _decode_lines(path, raw, problems)
    text = "\n".join(lines)
    stripped = text.lstrip()
    if not stripped and not problems.count:
        what = "holds only blank lines" if text else "is empty"
        raise GlmtuneError(f"{path}: the file {what}; it needs at least one sample")
    return _read_json_array(path, text) if stripped.startswith("[") else _read_jsonl(lines, problems)


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every record of a JSONL file or a JSON array file."""
    path = Path(path)
    problems = _Problems(path)
    records = _read(path, problems)
    problems.raise_if_any()
    if not records:
        raise GlmtuneError(f"{path}: no samples found")
    return records


def _read_jsonl(lines: list[str], problems: _Problems) -> list[tuple[int, Any]]:
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, loads(line)))
        except json.JSONDecodeError as e:
            problems.add(number, f"invalid JSON: {e.msg} (column {e.colno})")
        except NestingError as e:
            problems.add(number, f"invalid record: {e}")
    return records


class LineNumbers:
    """Line numbers of offsets in a text, asked in increasing order (records of a JSON array): each stretch
    of text is counted once, so a whole file costs one pass; counting from the start for every record
    cost time quadratic in the file's size (minutes for 8 MB). `scanned` counts the characters looked at."""

    def __init__(self, text: str):
        self.text, self.offset, self.line, self.scanned = text, 0, 1, 0

    def __call__(self, offset: int) -> int:
        if offset < self.offset:  # an earlier offset (not asked for by the reader): count afresh
            self.scanned += offset
            return self.text.count("\n", 0, offset) + 1
        self.scanned += offset - self.offset
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def _read_json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Parse a JSON array element by element so that each record keeps its line number."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    records = []
    line_of = LineNumbers(text)

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_space(pos)
    if pos < len(text) and text[pos] == "]":
        return records
    while True:
        pos = skip_space(pos)
        try:
            value, end = raw_decode(decoder, text, pos)
        except json.JSONDecodeError as e:
            raise GlmtuneError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        except NestingError as e:
            raise GlmtuneError(f"{path}:{line_of(pos)}: invalid record: {e}") from None
        records.append((line_of(pos), value))
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            rest = text[pos + 1:].strip()
            if rest:
                raise GlmtuneError(f"{path}:{line_of(pos + 1 + text[pos + 1:].index(rest[0]))}: "
                                   "unexpected text after the closing ]")
            return records
        raise GlmtuneError(f"{path}:{line_of(pos)}: invalid JSON: expected ',' or ']' after a record")


def _string_field(row: dict, key: str, line: int, problems: _Problems, *, required: bool,
                  allow_empty: bool = False) -> str | None:
    if key not in row or row[key] is None:
        if required:
            problems.add(line, f"missing field {key!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        problems.add(line, f"field {key!r} must be a string, got {type(value).__name__}")
        return None
    if not allow_empty and not value.strip():
        problems.add(line, f"field {key!r} is empty")
        return None
    return value


def _history(row: dict, line: int, problems: _Problems) -> list[Message] | None:
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        problems.add(line, f"field 'history' must be a list of [question, answer] pairs, got {type(history).__name__}")
        return None
    messages = []
    for i, pair in enumerate(history):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)):
            problems.add(line, f"history[{i}] must be a [question, answer] pair of strings")
            return None
        messages += [Message("user", pair[0]), Message("assistant", pair[1], trainable=False)]
    return messages


def _single_turn(row: dict, fmt: RowFormat, line: int, problems: _Problems,
                 require_answer: bool, prompt_template: str | None = None) -> list[Message] | None:
    before = problems.count
    if prompt_template:
        prompt, problem = fill_row(prompt_template, row)
        if problem:
            problems.add(line, problem)
    else:
        prompt = _string_field(row, fmt.prompt, line, problems, required=True)
    if fmt.name == "alpaca" and not prompt_template:
        extra = _string_field(row, "input", line, problems, required=False, allow_empty=True)
        if prompt is not None and extra and extra.strip():
            prompt = f"{prompt}\n{extra}"
    # A prediction input may carry an empty reference; a training sample may not.
    answer = _string_field(row, fmt.response, line, problems, required=require_answer,
                           allow_empty=not require_answer)
    system = _string_field(row, "system", line, problems, required=False, allow_empty=True)
    history = _history(row, line, problems)
    if problems.count > before:
        return None
    messages = [Message("system", system)] if system else []
    messages += history + [Message("user", prompt)]
    if answer and answer.strip():
        messages.append(Message("assistant", answer))
    return messages


def _conversation(row: dict, fmt: RowFormat, line: int, problems: _Problems,
                  require_answer: bool) -> list[Message] | None:
    turns = row.get(fmt.conversation)
    if not isinstance(turns, list) or not turns:
        problems.add(line, f"field {fmt.conversation!r} must be a non-empty list of messages")
        return None
    messages: list[Message] = []
    system = _string_field(row, "system", line, problems, required=False, allow_empty=True)
    if system:
        messages.append(Message("system", system))
    try:
        for i, turn in enumerate(turns):
            read_turn(messages, turn, f"{fmt.conversation}[{i}]")
        check_conversation(messages)
    except GlmtuneError as e:
        problems.add(line, str(e))
        return None
    if require_answer and messages[-1].role != "assistant":
        problems.add(line, f"{fmt.conversation!r} must end with an assistant message to be trained on")
        return None
    return messages


def _row_tools(row: dict, fmt: RowFormat, line: int, problems: _Problems) -> list[dict] | None:
    """The row's tool list: top-level `tools` (ChatGLM3's fine-tuning format, OpenAI's) or, in GLM-4's format,
    on the system message."""
    found = [("tools", row["tools"])] if row.get("tools") is not None else []
    turns = row.get(fmt.conversation) if fmt.conversation else None
    for i, turn in enumerate(turns if isinstance(turns, list) else []):
        if isinstance(turn, dict) and turn.get("tools") is not None:
            found.append((f"{fmt.conversation}[{i}].tools", turn["tools"]))
    if len(found) > 1:
        problems.add(line, f"tools are given twice ({found[0][0]} and {found[1][0]}); give them once")
        return None
    if not found:
        return None
    try:
        return check_tools(found[0][1], found[0][0])
    except GlmtuneError as e:
        problems.add(line, str(e))
        return None


def load_samples(path: str | Path, *, prompt_column: str | None = None, response_column: str | None = None,
                 require_answer: bool = True, prompt_template: str | None = None) -> tuple[list[Sample], RowFormat]:
    """Every row of `path` as a Sample, or one GlmtuneError listing each bad row by line number.
    `prompt_template` (None or "": none) writes each single-turn row's user message from its fields."""
    path = Path(path)
    problems = _Problems(path)
    records = _read(path, problems)
    if not records:
        problems.raise_if_any()
        raise GlmtuneError(f"{path}: no samples found")
    first_line, first = records[0]
    if not isinstance(first, dict):
        raise GlmtuneError(f"{path}:{first_line}: each record must be a JSON object, got {type(first).__name__}")
    try:
        fmt = detect_format(first, prompt_column, response_column, prompt_template)
    except GlmtuneError as e:
        raise GlmtuneError(f"{path}:{first_line}: {e}") from None
    if prompt_template:
        template_fields(prompt_template)  # a bad template is one error, not one per row
        if fmt.conversation:
            raise GlmtuneError(f"{path}:{first_line}: prompt_template fills single-turn rows (context/target, "
                               f"instruction/input/output, prompt/response or named columns) from their fields; "
                               f"{fmt.conversation!r} rows write every message out: leave prompt_template unset")
    samples = []
    for line, row in records:
        if not isinstance(row, dict):
            problems.add(line, f"each record must be a JSON object, got {type(row).__name__}")
            continue
        if fmt.conversation:
            messages = _conversation(row, fmt, line, problems, require_answer)
        else:
            messages = _single_turn(row, fmt, line, problems, require_answer, prompt_template)
        tools = _row_tools(row, fmt, line, problems)
        if messages is not None:
            samples.append(Sample(messages, row, f"{path}:{line}", tools=tools))
    problems.raise_if_any()
    return samples, fmt
