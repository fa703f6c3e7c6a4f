"""`glmtune chat`: an interactive terminal chat that streams the answer token by token.

Type a message and press Enter. `clear` forgets the conversation so far, `exit` (or Ctrl-D) leaves, Ctrl-C
while an answer streams stops that answer and keeps the session. With `--no-history` every message is
answered on its own. Answers come from the same engine as `serve` and `webui`. As the conversation grows, an
answer gets only the room the model's context has left (and says so when that cut it short); a conversation
whose prompt alone fills the context is an error message, not the end of the session.

With `--tools FILE` (ChatGLM3 and GLM-4 models) the model may call the tools listed there: a call is shown as
`[tool call] NAME {arguments}` and you type its result at `tool result> ` (an empty line skips the call and
forgets it); the model then answers with the result in view.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from glmtune.config import GenerationOptions
from glmtune.data.formats import Message
from glmtune.data.messages import ToolCall, check_tools, tool_name
from glmtune.errors import GlmtuneError, shown
from glmtune.serve.engine import BadRequest, ChatRequest, Failed, Finished, ToolCalled

BANNER = "glmtune chat: type a message; 'clear' starts over, 'exit' leaves, Ctrl-C stops an answer."


def read_tools_file(path: str) -> list[dict]:
    """The tool list in a JSON file (OpenAI's `{"type": "function", "function": {...}}` entries or ChatGLM3's
    `{"name", "description", "parameters"}`), or a GlmtuneError saying what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GlmtuneError(f"--tools {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise GlmtuneError(f"--tools {path}: not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if isinstance(tools, dict) and "tools" in tools:  # {"tools": [...]}, as a request or a data row holds them
        tools = tools["tools"]
    try:
        check_tools(tools, f"--tools {path}")
    except GlmtuneError as e:
        raise GlmtuneError(f"{e}; give a JSON list of tools") from None
    if not tools:
        raise GlmtuneError(f"--tools {path} lists no tools")
    for i, tool in enumerate(tools):
        if any(c.isspace() for c in tool_name(tool)):
            raise GlmtuneError(f"--tools {path}: tool {i} has white space in its name {shown(tool_name(tool), 60)}")
    return tools


def call_text(call: ToolCall) -> str:
    return f"[tool call] {call.name} {json.dumps(call.arguments, ensure_ascii=False)}"


def chat_loop(engine, *, keep_history: bool = True, system: str | None = None,
              generation: GenerationOptions | None = None, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout, tools: list[dict] | None = None) -> int:
    """Runs until `exit` or end of input; returns the number of answers given. `engine` is a ChatEngine
    (anything with its `stream(ChatRequest)`); `tools`: the functions the model may call (read_tools_file)."""
    generation = generation or GenerationOptions(max_new_tokens=512)
    history: list[Message] = []
    answered = 0
    out.write(BANNER + "\n")
    out.flush()
    while True:
        try:
            text = read("\nuser> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return answered
        command = text.strip().lower()
        if not command:
            continue
        if command in ("exit", "quit"):
            return answered
        if command == "clear":
            history = []
            out.write("(conversation cleared)\n")
            continue
        turn = [Message("user", text)]  # this question, the model's calls and their results, and its answer
        while True:  # one answer, and one more after each round of tool results
            messages = ([Message("system", system)] if system else []) + history + turn
            answer = _answer(engine, ChatRequest(messages, generation, fit_context=True, tools=tools), generation,
                             out, bool(history))
            if answer is None:  # refused: nothing was answered, nothing is kept
                turn = []
                break
            content, calls, failed = answer
            answered += 1
            if failed:  # a failed answer (out of memory, ...) is not kept: the next question is asked without it
                turn = []
                break
            if not calls:
                turn.append(Message("assistant", content.strip()))
                break
            results = _tool_results(calls, read, out)
            if results is None:  # Ctrl-D: leave
                return answered
            if len(results) < len(calls):  # skipped: the calls are forgotten, the question stays unanswered
                out.write("(tool call skipped)\n")
                turn = []
                break
            turn += [Message("assistant", content.strip(), tool_calls=calls), *results]
        if keep_history and turn:
            history += turn


def _answer(engine, request: ChatRequest, generation: GenerationOptions, out: TextIO,
            with_history: bool) -> tuple[str, list[ToolCall], bool] | None:
    """Streams one answer to `out`: (its text, its tool calls, whether it failed), or None when it was refused."""
    pieces: list[str] = []
    calls: list[ToolCall] = []
    note = ""
    failed = False
    try:
        events = engine.stream(request)
        out.write("assistant> ")
        for event in events:
            if isinstance(event, str):
                pieces.append(event)
                out.write(event)
                out.flush()
            elif isinstance(event, ToolCalled):
                calls.append(event.call)
                out.write(("\n" if pieces or len(calls) > 1 else "") + call_text(event.call))
                out.flush()
            elif isinstance(event, Failed):
                note, failed = f"(error: {event.message})", True
            elif isinstance(event, Finished) and event.finish_reason == "length":
                note = (f"(cut at {event.completion_tokens} tokens; --max-new-tokens allows longer answers)"
                        if event.completion_tokens >= generation.max_new_tokens else
                        f"(cut at {event.completion_tokens} tokens: the conversation fills the model's "
                        "context; type clear to start over)")
    except BadRequest as e:
        out.write(f"(error: {e}{'; type clear to start over' if with_history else ''})\n")
        return None
    except KeyboardInterrupt:
        note = "(stopped)"
    out.write("\n" + (note + "\n" if note else ""))
    return "".join(pieces), calls, failed


def _tool_results(calls: list[ToolCall], read: Callable[[str], str], out: TextIO) -> list[Message] | None:
    """The user's result for each call, as tool messages, up to the first empty one; None at end of input."""
    results = []
    for call in calls:
        if len(calls) > 1:
            out.write(f"({call.name})\n")
        try:
            text = read("tool result> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return None
        if not text.strip():
            break
        results.append(Message("tool", text, tool_call_id=call.id))
    return results
