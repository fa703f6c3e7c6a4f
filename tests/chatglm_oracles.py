"""Oracles the ChatGLM2/3 tokenizer and glmtune's templates are tested against (test code, not glmtune's):
ChatGLM3 conversations laid out as the official `build_chat_input` with where each message lies, the official
ChatGLM3 fine-tuning labels, and left padding of a batch as ChatGLM2/3's tokenizer pads."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from glmtune.models.chatglm2.tokenization import chatglm3_message_parts, left_pad_features


@dataclass(frozen=True)
class MessageSpan:
    """Where one message lies in a rendered conversation (token positions, end exclusive)."""

    role: str
    start: int  # the role token
    content_start: int  # first token of the text, after the role token and the metadata line
    end: int


@dataclass(frozen=True)
class ChatGLM3Rendering:
    input_ids: list[int]
    spans: list[MessageSpan]  # one per message, in order

    @property
    def assistant_mask(self) -> list[bool]:
        """True on every token of an assistant message, role token and metadata line included (the official
        fine-tuning script's loss mask before its one-token shift)."""
        mask = [False] * len(self.input_ids)
        for span in self.spans:
            if span.role == "assistant":
                mask[span.start:span.end] = [True] * (span.end - span.start)
        return mask


def render_chatglm3(
    tokenizer,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = True,
    add_prefix: bool = True,
) -> ChatGLM3Rendering:
    """A ChatGLM3 conversation as token ids, laid out as the official `build_chat_input`.

    `messages` are mappings (or objects) with `role` (system, user, assistant, observation), `content`, and
    optionally `metadata` (e.g. the tool name an assistant message calls) and, on a system message, `tools` (appended
    to the content as indented JSON). Each message is `<|role|>` + ids of `metadata + "\\n"` + ids of the content;
    `[gMASK] sop` goes first (`add_prefix`) and `<|assistant|>` last (`add_generation_prompt`).
    `build_chat_input(query, history, role)` equals this over `history + [{"role": role, "content": query}]`.
    """
    ids = tokenizer.get_prefix_tokens() if add_prefix else []
    spans: list[MessageSpan] = []
    for message in messages:
        role, metadata, content = chatglm3_message_parts(message)
        start = len(ids)
        ids = ids + [tokenizer.role_token_id(role)] + tokenizer.encode_text(f"{metadata}\n")
        content_start = len(ids)
        ids = ids + tokenizer.encode_text(content)
        spans.append(MessageSpan(role, start, content_start, len(ids)))
    if add_generation_prompt:
        ids = ids + [tokenizer.role_token_id("assistant")]
    return ChatGLM3Rendering(ids, spans)


def chatglm3_training_example(
    tokenizer, messages: Sequence[Any], *, ignore_index: int = -100
) -> dict[str, list[int]]:
    """`input_ids` and `labels` as the official ChatGLM3 fine-tuning script builds them: the rendered conversation
    (no generation prompt) + eos; a token is a label when the token before it belongs to an assistant message, so
    each answer trains its metadata line, its text and the token after it (the next role token, or eos)."""
    rendering = render_chatglm3(tokenizer, messages, add_generation_prompt=False)
    input_ids = rendering.input_ids + [tokenizer.eos_token_id]
    shifted = [False] + rendering.assistant_mask
    labels = [t if keep else ignore_index for t, keep in zip(input_ids, shifted)]
    return {"input_ids": input_ids, "labels": labels}


def left_pad_batch(input_ids_list: Iterable[Iterable[Any]], *, pad_id: int = 0, max_length: int | None = None,
                   pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """Left-pad token id lists as ChatGLM2/3's tokenizer does: int64 `input_ids`, `attention_mask` and
    `position_ids`, all `[B, L]`; L is the longest sequence (or `max_length`) rounded up to `pad_to_multiple_of`."""
    sequences = [[int(i) for i in (s.tolist() if hasattr(s, "tolist") else s)] for s in input_ids_list]
    longest = max((len(s) for s in sequences), default=0)
    length = longest if max_length is None else max_length
    if pad_to_multiple_of and length % pad_to_multiple_of:
        length = (length // pad_to_multiple_of + 1) * pad_to_multiple_of
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit max_length={length}")
    rows = [left_pad_features({"input_ids": s}, length, pad_id=pad_id) for s in sequences]
    return {key: np.asarray([r[key] for r in rows], dtype=np.int64).reshape(len(rows), length)
            for key in ("input_ids", "attention_mask", "position_ids")}
