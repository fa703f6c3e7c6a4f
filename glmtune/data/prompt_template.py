"""`prompt_template`: the user's prompt written from a row's fields, as the ChatGLM tutorials lay prompts out.

A prompt template is Python format text whose fields name columns of the row, e.g.
``"问：{instruction}\\n补充信息：{input}\\n答："``. Braces meant literally are doubled (``{{`` ``}}``). Only
plain names are fields: positional ``{}`` / ``{0}``, attribute or index access (``{a.b}``, ``{a[0]}``),
conversions and format specs are refused, so a template can never reach beyond the row's own text.

A row's field is filled as its text: a string as it is (an empty one renders empty), a number or true/false
as JSON writes it, null as empty text. The filled text is the user's message; the family's chat format
(chatglm, chatglm3, chat, ...) is applied around it afterwards, as for any message.

In chat, serve and the web UI the user types free text: a template with exactly one field is filled with it.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

from glmtune.errors import GlmtuneError, shown


def template_fields(template: str, option: str = "prompt_template") -> list[str]:
    """The field names of `template` in order of first use, or a one-line error naming `option`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # a lone { or }
        raise GlmtuneError(f"{option} {shown(template)} is not a valid template ({e}); write a field as "
                           "{name} and a literal brace as {{ or }}") from None
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise GlmtuneError(f"{option} {shown(template)}: fields must be named after the row's columns, e.g. "
                               "{instruction}; {} and {0} are not allowed (a literal brace is {{ or }})")
        if "." in name or "[" in name:
            raise GlmtuneError(f"{option} {shown(template)}: field {{{name}}} is not a plain column name "
                               "(no dots or brackets)")
        if spec or conversion:
            raise GlmtuneError(f"{option} {shown(template)}: field {{{name}}} has a format spec or conversion; "
                               "write just {" + name + "}")
        if name not in names:
            names.append(name)
    return names


def check_template(template: str | None, option: str = "prompt_template") -> str | None:
    """`template` when valid (None and "" stay as they are: no template)."""
    if template:
        template_fields(template, option)
    return template


_ESCAPES = re.compile(r"\\([\\nt])")


def layout(template: str) -> str:
    """The template's text with `\\n` and `\\t` written as two characters (as a shell or a single-quoted YAML
    string passes them) made a newline and a tab; `\\\\` is one backslash."""
    return _ESCAPES.sub(lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], template)


def _field_text(value: Any) -> str | None:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return None  # lists and objects are not prompt text


def fill_row(template: str, row: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the filled text, None) or (None, the problem) for one data row."""
    values = {}
    for name in template_fields(template):
        if name not in row:
            return None, (f"prompt_template needs field {name!r}, which this row lacks "
                          f"(its fields: {shown(sorted(map(str, row)), 200)})")
        text = _field_text(row[name])
        if text is None:
            return None, (f"field {name!r} used by prompt_template must be text, a number or null, "
                          f"got {type(row[name]).__name__}")
        values[name] = text
    filled = layout(template).format_map(values)
    if not filled.strip():
        return None, f"prompt_template made an empty prompt from this row (fields {', '.join(values)} are empty)"
    return filled, None


def chat_template_field(template: str, option: str = "--prompt-template") -> str:
    """The one field that chat, serve and the web UI fill with the user's message; an error otherwise."""
    names = template_fields(template, option)
    if len(names) != 1:
        what = f"has the fields {', '.join('{' + n + '}' for n in names)}" if names else "has no field"
        raise GlmtuneError(f"{option} {shown(template)} {what}; chat, serve and webui fill exactly one field with "
                           "the typed message (e.g. \"问：{query}\\n答：\"): give one with a single field, or "
                           "--prompt-template '' to send messages as typed")
    return names[0]


def fill_message(template: str, text: str) -> str:
    """A typed message in a one-field template."""
    return layout(template).format_map({chat_template_field(template): text})
