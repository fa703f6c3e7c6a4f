"""What a conversation is once read: messages, the tool calls an assistant makes, and the checks on their order.

One shape for every data format. Roles are system, user, assistant and tool. A tool call belongs to an assistant
message, as in OpenAI's API; the other formats are read into that shape:

- OpenAI: an assistant message's ``tool_calls`` (``function.arguments`` a JSON string or object) and ``tool``
  messages with the results (``tool_call_id`` optional);
- ChatGLM3's fine-tuning format: a ``tool`` entry with ``name``, ``parameters`` and ``observation`` is a call and
  its result;
- GLM-4's format and ChatGLM3's chat history: an assistant message whose ``metadata`` names the tool, its
  ``content`` the arguments (JSON, or ChatGLM3's ``tool_call(...)`` code); ``observation`` messages are results;
- ShareGPT (LLaMA-Factory): ``function_call`` turns (a JSON ``{"name", "arguments"}``) and ``observation`` turns.

A call written as its own assistant message right after an assistant's text is that text's call (its thought
first): one assistant turn, as both official scripts train it.

Every problem is a GlmtuneError naming the message (``messages[3]: ...``); formats.py adds the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from glmtune.errors import GlmtuneError, shown

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "tool": "tool", "observation": "tool", "function_call": "function_call",
}


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None

    def as_json(self) -> str:
        return json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False)


@dataclass
class Message:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    trainable: bool = True  # only meaningful for assistant messages
    tool_calls: list[ToolCall] = field(default_factory=list)  # assistant messages only
    tool_call_id: str | None = None  # tool messages: the call this result answers, when the data names it

    def reference_text(self) -> str:
        """The message as one text to compare a prediction with: its content, then each call as JSON."""
        return "\n".join([self.content] * bool(self.content) + [c.as_json() for c in self.tool_calls])


def check_tools(value: Any, where: str = "tools") -> list[dict]:
    """A tool list as the data gives it (kept as it is: the layouts print it), each entry an object with a name
    (``name`` or OpenAI's ``function.name``)."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise GlmtuneError(f"{where} must be a list of tool objects, got {shown(value, 80)}")
    for i, tool in enumerate(value):
        if not isinstance(tool_name(tool), str) or not tool_name(tool):
            raise GlmtuneError(f"{where}[{i}] has no name (give \"name\", or \"function\": {{\"name\": ...}})")
    return value


def tool_name(tool: dict) -> Any:
    function = tool.get("function")
    return function.get("name") if isinstance(function, dict) else tool.get("name")


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise GlmtuneError(f"{where}: the arguments are not valid JSON ({e.msg}, column {e.colno}): "
                               f"{shown(value, 80)}") from None
    if not isinstance(value, dict):
        raise GlmtuneError(f"{where}: the arguments must be a JSON object, got {shown(value, 80)}")
    return value


def _call(name: Any, arguments: Any, where: str, call_id: Any = None) -> ToolCall:
    if not isinstance(name, str) or not name.strip():
        raise GlmtuneError(f"{where}: a tool call needs the tool's name, got {shown(name, 60)}")
    if any(c.isspace() for c in name.strip()):
        raise GlmtuneError(f"{where}: tool name {shown(name, 60)} contains white space")
    if call_id is not None and not isinstance(call_id, str):
        raise GlmtuneError(f"{where}: a tool call's id must be a string, got {shown(call_id, 60)}")
    return ToolCall(name.strip(), _arguments(arguments, where), call_id)


def _openai_calls(value: Any, where: str) -> list[ToolCall]:
    if not isinstance(value, list) or not value:
        raise GlmtuneError(f"{where}: tool_calls must be a non-empty list of calls")
    calls = []
    for i, item in enumerate(value):
        at = f"{where}.tool_calls[{i}]"
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            raise GlmtuneError(f"{at} must be an object with \"function\": {{\"name\", \"arguments\"}}")
        if item.get("type", "function") != "function":
            raise GlmtuneError(f"{at}: only tool calls of type function are supported, got {shown(item.get('type'))}")
        calls.append(_call(function.get("name"), function.get("arguments", {}), at, item.get("id")))
    return calls


def _metadata_call(name: str, content: Any, where: str) -> ToolCall:
    """GLM-4's (JSON) or ChatGLM3's (``tool_call(...)`` code) arguments under a tool name."""
    from glmtune.data.tool_format import parse_python_call  # (the layouts' own module)

    if isinstance(content, str) and "tool_call(" in content and not content.lstrip().startswith("{"):
        arguments = parse_python_call(content)
        if arguments is None:
            raise GlmtuneError(f"{where}: the tool call is not of the form tool_call(name=value, ...): "
                               f"{shown(content, 80)}")
        return _call(name, arguments, where)
    return _call(name, content if content is not None else {}, where)


def _text(value: Any, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    raise GlmtuneError(f"{where}: {key!r} must be a string, got {type(value).__name__}")


def _result_text(value: Any) -> str:
    """A tool result as text; a structured result is written as JSON, as the official ChatGLM3 script does."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _unanswered(messages: list[Message]) -> tuple[Message | None, int]:
    """The last assistant message with tool calls, when the messages after it are only its results, and how
    many of its calls have no result yet."""
    results = 0
    for message in reversed(messages):
        if message.role == "tool":
            results += 1
        elif message.role == "assistant" and message.tool_calls:
            return message, len(message.tool_calls) - results
        else:
            return None, 0
    return None, 0


def read_turn(messages: list[Message], turn: Any, where: str) -> None:
    """Append one data message to `messages`, checking that it may come where it does."""
    if not isinstance(turn, dict):
        raise GlmtuneError(f"{where} must be an object with role and content")
    role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
    raw_role = turn.get(role_key)
    role = ROLE_ALIASES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
    if role is None:
        raise GlmtuneError(f"{where}: unknown role {shown(raw_role)}; use system, user, assistant or tool "
                           "(observation)")
    trainable = turn.get("loss", True) is not False  # ChatGLM3's per-message "loss": false
    if role == "tool" and "name" in turn and "tool_call_id" not in turn and content_key not in turn:
        # ChatGLM3's fine-tuning format: the call and its result in one entry
        _append(messages, Message("assistant", "", trainable, [_call(turn.get("name"), turn.get("parameters", {}),
                                                                     where)]), where)
        if "observation" in turn:
            _append(messages, Message("tool", _result_text(turn["observation"])), where)
        return
    content = turn.get(content_key)
    if role == "function_call":  # ShareGPT: the call as JSON text
        try:
            call = json.loads(_text(content, where, content_key))
        except json.JSONDecodeError as e:
            raise GlmtuneError(f"{where}: a function_call must be JSON {{\"name\", \"arguments\"}} ({e.msg})") from None
        if not isinstance(call, dict):
            raise GlmtuneError(f"{where}: a function_call must be a JSON object with name and arguments")
        _append(messages, Message("assistant", "", trainable, [_call(call.get("name"), call.get("arguments", {}),
                                                                     where)]), where)
        return
    if role == "tool":
        if content is None:
            raise GlmtuneError(f"{where}: a tool result needs its {content_key!r}")
        call_id = turn.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise GlmtuneError(f"{where}: tool_call_id must be a string, got {shown(call_id, 60)}")
        _append(messages, Message("tool", _result_text(content), tool_call_id=call_id), where)
        return
    calls: list[ToolCall] = []
    if role == "assistant":
        if turn.get("tool_calls") is not None:
            calls = _openai_calls(turn["tool_calls"], where)
        elif turn.get("function_call") is not None:  # OpenAI's older single call
            fc = turn["function_call"]
            if not isinstance(fc, dict):
                raise GlmtuneError(f"{where}: function_call must be an object with name and arguments")
            calls = [_call(fc.get("name"), fc.get("arguments", {}), where)]
        elif isinstance(turn.get("metadata"), str) and turn["metadata"].strip():
            calls = [_metadata_call(turn["metadata"], content, where)]
            content = ""
    if content is None and calls:
        content = ""
    content = _text(content, where, content_key)
    _append(messages, Message(role, content, trainable, calls), where)


def _append(messages: list[Message], message: Message, where: str) -> None:
    """Add `message` if it may follow the ones before it. A call right after an assistant's text (ChatGLM3's and
    GLM-4's data write them as two assistant messages) joins that text as its thought: one assistant turn."""
    role = message.role
    last = messages[-1] if messages else None
    if (role == "assistant" and message.tool_calls and not message.content and last is not None
            and last.role == "assistant" and not last.tool_calls):
        last.tool_calls.extend(message.tool_calls)
        last.trainable = last.trainable and message.trainable
        return
    waiting, missing = _unanswered(messages)
    if role == "system":
        if messages:
            raise GlmtuneError(f"{where}: a system message may only come first")
    elif role == "tool":
        if waiting is None:
            raise GlmtuneError(f"{where}: a tool result with no tool call before it")
        if missing <= 0:
            raise GlmtuneError(f"{where}: more tool results than the {len(waiting.tool_calls)} call(s) before them")
        ids = [c.id for c in waiting.tool_calls if c.id]
        if message.tool_call_id and ids and message.tool_call_id not in ids:
            raise GlmtuneError(f"{where}: tool_call_id {shown(message.tool_call_id)} matches no call before it "
                               f"({', '.join(ids)})")
    else:
        if missing > 0:
            raise GlmtuneError(f"{where}: {missing} tool call(s) before this message have no tool result")
        if role == "assistant":
            if last is None or last.role == "system":
                raise GlmtuneError(f"{where}: expected a user message here (user and assistant must alternate)")
            if last.role == "assistant":
                raise GlmtuneError(f"{where}: expected a user message here (user and assistant must alternate)")
            if not message.content.strip() and not message.tool_calls:
                raise GlmtuneError(f"{where}: empty assistant answer")
        elif last is not None and last.role == "user":
            raise GlmtuneError(f"{where}: expected an assistant message here (user and assistant must alternate)")
        elif last is not None and last.role == "tool":
            raise GlmtuneError(f"{where}: expected an assistant message after the tool results")
    messages.append(message)


def check_conversation(messages: list[Message]) -> None:
    """What only the whole conversation shows: it has a question."""
    if not any(m.role == "user" for m in messages):
        raise GlmtuneError("the conversation has no user message")
