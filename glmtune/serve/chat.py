"""`glmtune chat`: an interactive terminal chat that streams the answer token by token.

Type a message and press Enter. `clear` forgets the conversation so far, `exit` (or Ctrl-D) leaves.
With `--no-history` every message is answered on its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from glmtune.data.formats import Message
from glmtune.evaluate.generate import Generator, Sampling

BANNER = "glmtune chat: type a message; 'clear' starts over, 'exit' leaves."


def chat_loop(generator: Generator, *, keep_history: bool = True, system: str | None = None,
              sampling: Sampling | None = None, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout) -> int:
    """Runs until `exit` or end of input; returns the number of answers given."""
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
        out.write("assistant> ")
        pieces = []
        for piece in generator.stream(messages, sampling):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        answered += 1
        if keep_history:
            history += [Message("user", text), Message("assistant", "".join(pieces).strip())]
