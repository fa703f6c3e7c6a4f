"""How ChatGLM3 and GLM-4 write tools and tool calls as text, both ways: the layouts (templates.py) write them
into prompts and answers, serve reads a model's answer back into calls.

- ChatGLM3 (its fine-tuning script and ``chat()``): the tools go in a system message, an English sentence then
  the list as JSON indented by 4; a call is an assistant message whose metadata line is the tool's name and
  whose text is ``tool_call(key=value, ...)`` as Python in a fenced ``python`` block.
- GLM-4 (its chat template): the tools go in a system message, a fixed Chinese introduction, ``# 可用工具``, then
  per function its name as a heading, the function object as JSON indented by 4 and a closing sentence; a call
  is an assistant message whose metadata line is the tool's name and whose text is the arguments as JSON.

These texts are the prompt formats the official models were trained with, so they must match exactly.
"""

from __future__ import annotations

import ast
import json
import keyword
from typing import Any

from glmtune.data.messages import ToolCall, tool_name
from glmtune.errors import GlmtuneError, shown

TOOL_STYLES = ("chatglm3", "glm4")  # the prompt formats (templates.py names) with a tool-calling format
CHATGLM3_TOOLS_INTRO = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_TOOLS_INTRO = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_FUNCTION_OUTRO = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
PYTHON_FENCE, FENCE_END = "```python\n", "\n```"


def chatglm3_tools_text(tools: list[dict]) -> str:
    return CHATGLM3_TOOLS_INTRO + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)


def glm4_tools_text(tools: list[dict]) -> str:
    text = GLM4_TOOLS_INTRO
    for tool in tools:
        if "function" in tool or tool.get("type") == "function":
            if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
                raise GlmtuneError(f"GLM-4 renders tools of type function only, got {shown(tool.get('type'))}")
            function = tool["function"]
        elif "type" in tool:  # GLM-4's built-in tools (python, simple_browser, cogview) have texts of their own
            raise GlmtuneError(f"GLM-4 tool of type {shown(tool['type'])} is not supported; give functions "
                               "({\"type\": \"function\", \"function\": {...}})")
        else:  # a bare function description, as ChatGLM3's data writes tools
            function = tool
        text += f"\n\n## {tool_name(tool)}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}{GLM4_FUNCTION_OUTRO}"
    return text


def python_call_text(call: ToolCall) -> str:
    """ChatGLM3's call text: ``tool_call(a='x', n=2)`` in a python block (values written as Python literals)."""
    for key in call.arguments:
        if not key.isidentifier() or keyword.iskeyword(key):
            raise GlmtuneError(f"tool {call.name}: argument {shown(key)} is not a Python name, and ChatGLM3 writes "
                               "calls as tool_call(name=value, ...)")
    args = ", ".join(f"{key}={_python_literal(value)}" for key, value in call.arguments.items())
    return f"{PYTHON_FENCE}tool_call({args}){FENCE_END}"


def _python_literal(value: Any) -> str:
    return ast.unparse(ast.Constant(value)) if not isinstance(value, (list, dict)) else repr(value)


def parse_python_call(text: str) -> dict[str, Any] | None:
    """The keyword arguments of ``tool_call(...)`` (optionally fenced), read as literals (never run), or None."""
    code = text.strip()
    if code.startswith("```"):
        code = code.split("\n", 1)[1] if "\n" in code else ""
        code = code[: code.rfind("```")] if "```" in code else code
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
            and all(k.arg for k in node.keywords)):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, SyntaxError, TypeError):
        return None


def json_call_text(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)


def parse_tool_call(answer: str, style: str, tool_names: set[str] | None = None) -> ToolCall | None:
    """The call in a generated answer (the text after ``<|assistant|>``), or None when it is a plain answer.

    A plain answer starts with the (empty) metadata line's newline; a call starts with the tool's name on that
    line. GLM-4 data written as the fine-tuning README shows, ``{"name": ..., "arguments": {...}}`` as the
    answer's text, is read as a call too. With `tool_names`, a name outside them is not a call."""
    head, _, body = answer.partition("\n")
    name = head.strip()
    arguments: Any = None
    if name and " " not in name and body.strip():
        if style == "chatglm3":
            arguments = parse_python_call(body)
        else:
            try:
                arguments = json.loads(body)
            except json.JSONDecodeError:
                arguments = None
    elif style == "glm4" and answer.strip().startswith("{"):
        try:
            whole = json.loads(answer)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get("name"), str) and isinstance(whole.get("arguments"), dict):
            name, arguments = whole["name"], whole["arguments"]
    if not isinstance(arguments, dict) or (tool_names is not None and name not in tool_names):
        return None
    return ToolCall(name, arguments)
