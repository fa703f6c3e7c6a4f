"""`glmtune chat`: an interactive terminal chat that streams the answer token by token.

Type a message and press Enter. `clear` forgets the conversation so far, `exit` (or Ctrl-D) leaves, Ctrl-C
while an answer streams stops that answer and keeps the session. With `--no-history` every message is
answered on its own. Answers come from the same engine as `serve` and `webui`. As the conversation grows, an
answer gets only the room the model's context has left (and says so when that cut it short); a conversation
whose prompt alone fills the context is an error message, not the end of the session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from glmtune.config import GenerationOptions
from glmtune.data.formats import Message
from glmtune.serve.engine import BadRequest, ChatRequest, Failed, Finished

BANNER = "glmtune chat: type a message; 'clear' starts over, 'exit' leaves, Ctrl-C stops an answer."


def chat_loop(engine, *, keep_history: bool = True, system: str | None = None,
              generation: GenerationOptions | None = None, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout) -> int:
    """Runs until `exit` or end of input; returns the number of answers given. `engine` is a ChatEngine
    (anything with its `stream(ChatRequest)`)."""
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
        messages = ([Message("system", system)] if system else []) + history + [Message("user", text)]
        request = ChatRequest(messages, generation, fit_context=True)
        pieces: list[str] = []
        note = ""
        failed = False  # a failed answer (out of memory, ...) is not kept: the next question is asked without it
        try:
            events = engine.stream(request)
            out.write("assistant> ")
            for event in events:
                if isinstance(event, str):
                    pieces.append(event)
                    out.write(event)
                    out.flush()
                elif isinstance(event, Failed):
                    note, failed = f"(error: {event.message})", True
                elif isinstance(event, Finished) and event.finish_reason == "length":
                    note = (f"(cut at {event.completion_tokens} tokens; --max-new-tokens allows longer answers)"
                            if event.completion_tokens >= generation.max_new_tokens else
                            f"(cut at {event.completion_tokens} tokens: the conversation fills the model's "
                            "context; type clear to start over)")
        except BadRequest as e:
            out.write(f"(error: {e}{'; type clear to start over' if history else ''})\n")
            continue
        except KeyboardInterrupt:
            note = "(stopped)"
        out.write("\n" + (note + "\n" if note else ""))
        answered += 1
        if keep_history and not failed:
            history += [Message("user", text), Message("assistant", "".join(pieces).strip())]
