"""Prompt formats: turn a conversation into text segments that alternate prompt and answer.

A template never tokenizes; it says which text is prompt (no loss), which is answer (trained when the
message is), and inside each segment which text is the user's or assistant's own content (the part
that truncation may cut) and which is template scaffolding (kept whole). Training and generation render
prompts through the same segments, so a model sees at inference exactly the prompt tokens it was
trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.data.formats import Message
from glmtune.errors import GlmtuneError


@dataclass
class Part:
    text: str
    content: bool  # True: a message's own text (may be cut); False: template scaffolding (kept whole)
    special: bool = False  # `text` names one special token, inserted by id (tokenizers may not parse it in text)
    separate: bool = False  # tokenized on its own, not joined with its neighbours (as the official code does)


@dataclass
class Segment:
    parts: list[Part]
    answer: bool = False  # an assistant message; it must end with an end-of-sequence token
    trainable: bool = False  # labels are kept on this segment's tokens

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts)


def _split_around(text: str, content: str, *, last: bool) -> list[Part]:
    """Parts of `text` with `content` marked as cuttable (scaffolding before and after kept whole)."""
    at = text.rfind(content) if last else text.find(content)
    if not content or at < 0:
        return [Part(text, content=False)]
    parts = [Part(text[:at], False), Part(content, True), Part(text[at + len(content):], False)]
    return [p for p in parts if p.text]


class Template:
    name = "base"

    def render(self, messages: list[Message]) -> list[Segment]:
        """Segments for a conversation. Ending with an assistant message: prompt, answer, prompt, answer...
        Ending with a user message: the same, then the prompt that asks for the next answer."""
        raise NotImplementedError


class PlainTemplate(Template):
    """No scaffolding: the prompt text, then the answer followed by the end-of-sequence token.

    This is how the ChatGLM tutorials feed `context`/`target` data, and the right choice for base
    models without a chat template. A system message is put before the first prompt on its own line.
    """

    name = "plain"

    def render(self, messages: list[Message]) -> list[Segment]:
        segments: list[Segment] = []
        pending: list[Part] = []
        for message in messages:
            if message.role == "system":
                pending += [Part(message.content, True), Part("\n", False)]
            elif message.role == "user":
                pending.append(Part(message.content, True))
            else:
                segments.append(Segment(pending))
                segments.append(Segment([Part(message.content, True)], answer=True, trainable=message.trainable))
                pending = []
        if pending:
            segments.append(Segment(pending))
        return segments


class ChatTemplate(Template):
    """The tokenizer's own chat template (Jinja), split into segments by rendering growing prefixes of
    the conversation: the text each assistant message adds is its answer segment, the rest is prompt."""

    name = "chat"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise GlmtuneError("this tokenizer has no chat template; use template: plain")
        self.tokenizer = tokenizer

    def _apply(self, messages: list[Message], generation_prompt: bool) -> str:
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, messages: list[Message]) -> list[Segment]:
        segments: list[Segment] = []
        done = ""  # text rendered so far
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = self._apply(messages[:i], generation_prompt=True)
            full = self._apply(messages[: i + 1], generation_prompt=False)
            self._check_prefix(done, prompt)
            self._check_prefix(prompt, full)
            segments.append(Segment(_split_around(prompt[len(done):], messages[i - 1].content, last=True)))
            segments.append(Segment(_split_around(full[len(prompt):], message.content, last=False),
                                    answer=True, trainable=message.trainable))
            done = full
        if messages and messages[-1].role != "assistant":
            prompt = self._apply(messages, generation_prompt=True)
            self._check_prefix(done, prompt)
            segments.append(Segment(_split_around(prompt[len(done):], messages[-1].content, last=True)))
        return segments

    @staticmethod
    def _check_prefix(prefix: str, text: str) -> None:
        if not text.startswith(prefix):
            raise GlmtuneError(
                "this tokenizer's chat template renders earlier turns differently once a later turn is added, "
                "so answers cannot be separated from prompts; use template: plain")


def _question_rounds(messages: list[Message]) -> tuple[Message | None, list[Part], list[list[str]], str]:
    """For the [Round i] layouts: (the answer to train or None, system parts, earlier [question, answer]
    rounds oldest first, the question to answer)."""
    answer = messages[-1] if messages and messages[-1].role == "assistant" else None
    system: list[Part] = []
    rounds: list[list[str]] = []
    for message in messages[:-1] if answer else messages:
        if message.role == "system":
            system += [Part(message.content, True), Part("\n", False)]
        elif message.role == "user":
            rounds.append([message.content, ""])
        elif rounds:
            rounds[-1][1] = message.content
        else:  # an answer before any question: keep it as context
            rounds.append(["", message.content])
    question = rounds.pop()[0] if rounds else ""
    return answer, system, rounds, question


class ChatGLMTemplate(Template):
    """ChatGLM-6B's layout, as its official chat() and P-Tuning scripts build it.

    A lone question is the prompt as it is; earlier turns become `[Round i]\n问：…\n答：…\n` text in front
    of `[Round n]\n问：{question}\n答：`. The prompt ends with `[gMASK]`; the answer segment starts with
    `<sop>`, which is a target as in the official training, and the encoder ends it with `<eop>`. The
    model sees everything before `<sop>` bidirectionally, so a sample holds one answer: earlier answers
    are prompt text, not trained. A system message goes in front on its own line.
    """

    name = "chatglm"

    def __init__(self, gmask: str = "[gMASK]", sop: str = "<sop>"):
        self.gmask, self.sop = gmask, sop

    def render(self, messages: list[Message]) -> list[Segment]:
        answer, parts, rounds, question = _question_rounds(messages)
        for i, (q, a) in enumerate(rounds):
            parts += [Part(f"[Round {i}]\n问：", False), Part(q, True), Part("\n答：", False), Part(a, True),
                      Part("\n", False)]
        if rounds:
            parts += [Part(f"[Round {len(rounds)}]\n问：", False), Part(question, True), Part("\n答：", False)]
        else:
            parts.append(Part(question, True))
        parts = [p for p in parts if p.text]
        parts.append(Part(self.gmask, False, special=True))
        sop = Part(self.sop, False, special=True)
        if answer is None:
            return [Segment(parts + [sop])]
        return [Segment(parts), Segment([sop, Part(answer.content, True)], answer=True, trainable=answer.trainable)]


class ChatGLM2Template(Template):
    """ChatGLM2-6B's layout, as its official tokenizer's `build_prompt` and P-Tuning script build it.

    The prompt is `[gMASK] sop` then `[Round 1]\n\n问：{question}\n\n答：`, earlier turns in front as
    `[Round i]\n\n问：…\n\n答：…\n\n` (rounds count from 1, also for a lone question). The answer follows
    and the encoder ends it with the eos token. As in ChatGLM-6B one sample trains one answer: earlier
    answers are prompt text. A system message goes in front on its own line.
    """

    name = "chatglm2"

    def render(self, messages: list[Message]) -> list[Segment]:
        answer, system, rounds, question = _question_rounds(messages)
        parts = [Part("[gMASK]", False, special=True), Part("sop", False, special=True)] + system
        for i, (q, a) in enumerate(rounds, start=1):
            parts += [Part(f"[Round {i}]\n\n问：", False), Part(q, True), Part("\n\n答：", False), Part(a, True),
                      Part("\n\n", False)]
        parts += [Part(f"[Round {len(rounds) + 1}]\n\n问：", False), Part(question, True), Part("\n\n答：", False)]
        parts = [p for p in parts if p.text]
        if answer is None:
            return [Segment(parts)]
        return [Segment(parts), Segment([Part(answer.content, True)], answer=True, trainable=answer.trainable)]


class ChatGLM3Template(Template):
    """ChatGLM3-6B's role-token layout, as its official `build_chat_input` and fine-tuning script build it.

    `[gMASK] sop`, then per message its role token, `\n` and the text (each tokenized on its own); a prompt
    for generation ends with `<|assistant|>`. Every assistant turn trains (the loss is on assistant turns
    only). As in the official fine-tuning, the targets of a turn are its `\n`, its text and the token that
    follows it: the next role token (`<|user|>`, a stop token) or, after the last turn, eos.
    """

    name = "chatglm3"

    def render(self, messages: list[Message]) -> list[Segment]:
        segments: list[Segment] = []
        pending = [Part("[gMASK]", False, special=True), Part("sop", False, special=True)]
        for i, message in enumerate(messages):
            role = Part(f"<|{message.role}|>", False, special=True)
            body = [Part("\n", False, separate=True), Part(message.content, True, separate=True)]
            if message.role != "assistant":
                after_answer = i > 0 and messages[i - 1].role == "assistant"
                pending += ([] if after_answer else [role]) + body  # an answer segment already holds its role
                continue
            segments.append(Segment(pending + [role]))
            pending = []
            if i + 1 < len(messages):
                body.append(Part(f"<|{messages[i + 1].role}|>", False, special=True))
            segments.append(Segment(body, answer=True, trainable=message.trainable))
        if pending:
            segments.append(Segment(pending + [Part("<|assistant|>", False, special=True)]))
        return segments


class GLM4Template(Template):
    """GLM-4's role-token layout, as its Hugging Face chat template renders it: `[gMASK]<sop>`, then per
    message its role token, `\n` and the text; a prompt for generation ends with `<|assistant|>`. The
    trained part of an assistant turn is its `\n` and text, then the encoder's end-of-sequence token
    (`<|endoftext|>`), exactly what `template: chat` gives with a GLM-4 tokenizer. Used when a GLM-4
    tokenizer has no chat template of its own.
    """

    name = "glm4"

    def render(self, messages: list[Message]) -> list[Segment]:
        segments: list[Segment] = []
        pending = [Part("[gMASK]", False, special=True), Part("<sop>", False, special=True)]
        for message in messages:
            if message.role == "assistant":
                segments.append(Segment(pending + [Part("<|assistant|>", False, special=True)]))
                segments.append(Segment([Part("\n", False), Part(message.content, True)], answer=True,
                                        trainable=message.trainable))
                pending = []
            else:
                pending += [Part(f"<|{message.role}|>", False, special=True), Part("\n", False),
                            Part(message.content, True)]
        if pending:
            segments.append(Segment(pending + [Part("<|assistant|>", False, special=True)]))
        return [Segment([p for p in s.parts if p.text], s.answer, s.trainable) for s in segments]


FAMILY_TEMPLATES = {"chatglm": ChatGLMTemplate, "chatglm2": ChatGLM2Template, "chatglm3": ChatGLM3Template}
# Families whose own layout is only the fallback for a tokenizer without a chat template.
FALLBACK_TEMPLATES = {"glm4": GLM4Template}


def get_template(name: str, tokenizer, family: str = "generic") -> Template:
    """The template called `name` ('auto' picks the family's own, else the chat template, else the family's
    fallback layout, else plain)."""
    fallback = FALLBACK_TEMPLATES.get(family)
    if fallback is not None and (name == fallback.name or (name == "auto" and not getattr(tokenizer, "chat_template",
                                                                                         None))):
        return fallback()
    own = FAMILY_TEMPLATES.get(family)
    if own is not None:
        if name not in ("auto", own.name):
            raise GlmtuneError(f"a {family} model needs its own prompt layout; use template: {own.name} (or auto)")
        return own()
    if name == "auto":
        name = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if name == "chat":
        return ChatTemplate(tokenizer)
    if name == "plain":
        return PlainTemplate()
    if name in {t.name for t in [*FAMILY_TEMPLATES.values(), *FALLBACK_TEMPLATES.values()]}:
        raise GlmtuneError(f"template {name} is for {name} models only; this is a {family} model (use auto)")
    raise GlmtuneError(f"unknown template {name!r}; use auto, chat or plain")
