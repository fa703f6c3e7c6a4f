"""Prompt formats: turn a conversation into text segments that alternate prompt and answer.

A template never tokenizes; it says which text is prompt (no loss), which is answer (trained when the
message is), and inside each segment which text is the user's or assistant's own content (the part
that truncation may cut) and which is template scaffolding (kept whole). Training and generation render
prompts through the same segments, so a model sees at inference exactly the prompt tokens it was
trained on. Because content is marked as such, the encoder can keep it plain text: a message that spells
a control token (`<|im_start|>`, `<|user|>`) cannot start a turn of its own (see Encoder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glmtune.data.formats import Message
from glmtune.data.tool_format import chatglm3_tools_text, glm4_tools_text, json_call_text, python_call_text
from glmtune.errors import GlmtuneError
from glmtune.families import family_facts


@dataclass
class Part:
    text: str
    content: bool  # True: a message's own text (may be cut); False: template scaffolding (kept whole)
    special: bool = False  # `text` names one special token, inserted by id (tokenizers may not parse it in text)
    separate: bool = False  # tokenized on its own, not joined with its neighbours (as the official code does)
    # A control-token string that a chat template copied out of a message where the message's text could not
    # be located (e.g. a system message, or text the template trimmed): message text, though not cuttable.
    literal: bool = False


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


def control_tokens(tokenizer) -> list[str]:
    """The strings `tokenizer` may read out of text as control tokens: its special tokens, named and added
    (longest first). Added tokens that are not special (extra vocabulary) are ordinary words."""
    names = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    names.update(str(t) for t in added.values() if getattr(t, "special", False))
    return sorted((n for n in names if n and not n.isspace()), key=len, reverse=True)


def control_pattern(tokenizer) -> re.Pattern | None:
    """A regex for `control_tokens`; case-blind, as some tokenizers lower-case text before matching."""
    tokens = control_tokens(tokenizer)
    return re.compile("|".join(map(re.escape, tokens)), re.IGNORECASE) if tokens else None


class Template:
    name = "base"
    one_answer = False  # a sample holds one trained answer (earlier answers are prompt text)

    def render(self, messages: list[Message], *, protect: bool = False, tools: list[dict] | None = None) -> list[Segment]:
        """Segments for a conversation. Ending with an assistant message: prompt, answer, prompt, answer...
        Ending with a user message: the same, then the prompt that asks for the next answer.
        `protect`: every control-token string written in a message ends up in a content or literal part (the
        layouts below put message text only in content parts anyway; ChatTemplate needs to be told)."""
        raise NotImplementedError


class PlainTemplate(Template):
    """No scaffolding: the prompt text, then the answer followed by the end-of-sequence token.

    This is how the ChatGLM tutorials feed `context`/`target` data, and the right choice for base
    models without a chat template. A system message is put before the first prompt on its own line.
    """

    name = "plain"

    def render(self, messages: list[Message], *, protect: bool = False, tools: list[dict] | None = None) -> list[Segment]:
        _tool_free(messages, tools, "plain")
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
    the conversation: the text each assistant message adds is its answer segment, the rest is prompt.

    Protected, control-token strings in messages are wrapped in two marker characters before rendering, so
    that wherever the template copies them (also where a message's text cannot be located: a system message
    in front of the question, or text the template trimmed) they come out as literal parts, not scaffolding."""

    name = "chat"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise GlmtuneError("this tokenizer has no chat template; use template: plain")
        self.tokenizer = tokenizer
        self._controls: re.Pattern | None = None
        self._tools_checked: set[tuple[bool, bool, bool]] = set()  # kinds of tool content found rendered

    def _apply(self, messages: list[Message], generation_prompt: bool, marks: tuple[str, str] | None,
               tools: list[dict] | None = None) -> str:
        dicts = [self._as_dict(m, marks) for m in messages]
        extra = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation_prompt,
                                                      **extra)
        except Exception as e:  # the template's own checks (raise_exception): this conversation's fault
            raise GlmtuneError(f"the model's chat template cannot render this conversation: {e}") from None

    def _as_dict(self, message: Message, marks: tuple[str, str] | None) -> dict:
        """A message as transformers' chat templates take it (tool calls as OpenAI writes them, arguments an object)."""
        out = {"role": message.role, "content": self._mark(message.content, marks)}
        if message.tool_calls:
            out["tool_calls"] = [{"type": "function", **({"id": c.id} if c.id else {}),
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in message.tool_calls]
        if message.tool_call_id:
            out["tool_call_id"] = message.tool_call_id
        return out

    def _check_tools(self, messages: list[Message], tools: list[dict] | None) -> None:
        """Refuse tool conversations the template would drop silently (e.g. GLM-4's, which reads tools from a
        message, not from the `tools` argument): each kind of tool content must change what it renders."""
        asked = Message("user", "?")
        call = next((m for m in messages if m.tool_calls), None)
        result = next((m for m in messages if m.role == "tool"), None)
        kinds = (bool(tools), call is not None, result is not None)
        if not any(kinds) or kinds in self._tools_checked:  # what a template renders depends on the kinds only
            return
        dropped = []
        if tools and self._apply([asked], True, None, tools) == self._apply([asked], True, None):
            dropped.append("tool definitions")
        if call is not None:
            without = Message("assistant", call.content or "...")
            if self._apply([asked, call], False, None, tools) == self._apply([asked, without], False, None, tools):
                dropped.append("tool calls")
            if result is not None:
                answered = [asked, call, result]
                if self._apply(answered, True, None, tools) == self._apply(answered[:2], True, None, tools):
                    dropped.append("tool results")
        elif result is not None:
            dropped.append("tool results")  # (the conversation checks refuse a result without its call first)
        if dropped:
            raise GlmtuneError(f"this model's chat template leaves out {' and '.join(dropped)}; tool conversations "
                               "need a chatglm3 or glm4 model, or a chat template that renders tools")
        self._tools_checked.add(kinds)

    def _control_pattern(self) -> re.Pattern | None:
        if self._controls is None:
            self._controls = control_pattern(self.tokenizer) or re.compile(r"(?!)")
        return self._controls

    def _marks(self, messages: list[Message]) -> tuple[str, str] | None:
        """Two private-use characters that occur neither in the messages nor in the template, or None when
        no message spells a control token (then nothing is marked and the rendering is the usual one)."""
        pattern = self._control_pattern()
        if not any(pattern.search(m.content) for m in messages):
            return None
        template = self.tokenizer.chat_template
        template = template if isinstance(template, str) else "".join(map(str, dict(template).values()))
        used = set(template).union(*(m.content for m in messages))
        free = [c for c in map(chr, range(0xE000, 0xF900)) if c not in used][:2]
        if len(free) < 2:
            raise GlmtuneError("these messages use every private-use character; glmtune needs two of them free")
        return free[0], free[1]

    def _mark(self, text: str, marks: tuple[str, str] | None) -> str:
        if marks is None:
            return text
        return self._control_pattern().sub(lambda m: f"{marks[0]}{m.group(0)}{marks[1]}", text)

    @staticmethod
    def _unmark(parts: list[Part], marks: tuple[str, str] | None) -> list[Part]:
        """Markers removed; a marked string outside located message text becomes a literal part."""
        if marks is None:
            return parts
        start, end = marks
        marked = re.compile(f"{re.escape(start)}(.*?){re.escape(end)}", re.DOTALL)

        def clean(text: str) -> str:  # a marker whose partner the template cut away
            return text.replace(start, "").replace(end, "")

        out: list[Part] = []
        for part in parts:
            if part.content:  # all of it is message text anyway
                out.append(Part(clean(part.text), True))
                continue
            at = 0
            for m in marked.finditer(part.text):
                out += [Part(clean(part.text[at:m.start()]), False), Part(m.group(1), False, literal=True)]
                at = m.end()
            out.append(Part(clean(part.text[at:]), False))
        return [p for p in out if p.text]

    def render(self, messages: list[Message], *, protect: bool = False, tools: list[dict] | None = None) -> list[Segment]:
        self._check_tools(messages, tools)
        marks = self._marks(messages) if protect else None

        def split(text: str, content: str, last: bool) -> list[Part]:
            return self._unmark(_split_around(text, self._mark(content, marks), last=last), marks)

        segments: list[Segment] = []
        done = ""  # text rendered so far
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            full = self._apply(messages[: i + 1], False, marks, tools)
            if i == 0:  # nothing to render before it: its prompt is what the template writes before its text
                at = full.find(self._mark(message.content, marks)) if message.content else -1
                if at < 0:
                    raise GlmtuneError("the model's chat template cannot start a conversation with an assistant "
                                       "message; start with a user (or system) message")
                prompt, asked = full[:at], ""
            else:
                prompt, asked = self._apply(messages[:i], True, marks, tools), messages[i - 1].content
            self._check_prefix(done, prompt)
            self._check_prefix(prompt, full)
            segments.append(Segment(split(prompt[len(done):], asked, True)))
            segments.append(Segment(split(full[len(prompt):], message.content, False),
                                    answer=True, trainable=message.trainable))
            done = full
        if messages and messages[-1].role != "assistant":
            prompt = self._apply(messages, True, marks, tools)
            self._check_prefix(done, prompt)
            segments.append(Segment(split(prompt[len(done):], messages[-1].content, True)))
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
    one_answer = True

    def __init__(self, gmask: str = "[gMASK]", sop: str = "<sop>"):
        self.gmask, self.sop = gmask, sop

    def render(self, messages: list[Message], *, protect: bool = False, tools: list[dict] | None = None) -> list[Segment]:
        _tool_free(messages, tools, "ChatGLM-6B")
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
    one_answer = True

    def render(self, messages: list[Message], *, protect: bool = False, tools: list[dict] | None = None) -> list[Segment]:
        _tool_free(messages, tools, "ChatGLM2-6B")
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


def _tool_free(messages: list[Message], tools: list[dict] | None, layout: str) -> None:
    """Refuse tools where a layout has no way to write them."""
    if tools or any(m.role == "tool" or m.tool_calls for m in messages):
        raise GlmtuneError(f"the {layout} layout has no tool-calling format; tool conversations need a chatglm3 or "
                           "glm4 model, or a chat template that renders tools")


class _RoleTokenLayout(Template):
    """ChatGLM3's and GLM-4's shared shape: after a prefix, each message is its role token, a metadata line (empty,
    or the name of the tool an assistant calls) and the text. Tool results are `<|observation|>` messages and the
    tools a system message first. As in both official fine-tuning scripts, an assistant message trains its
    metadata line, its text and the token after it: the next role token, or at the very end `end_token` (None:
    the encoder's end-of-sequence token). An assistant message with several calls (or a thought and a call) is
    one trained answer that spells each call as its own `<|assistant|>` message."""

    prefix: tuple[str, str]
    end_token: str | None = None
    separate = False  # whether the metadata line and the text are tokenized on their own (ChatGLM3)
    skip_empty = False  # messages with empty text left out (GLM-4)

    @classmethod
    def fits(cls, tokenizer) -> bool:
        """Whether `tokenizer` has every control token this layout writes."""
        vocab = tokenizer.get_vocab()
        return all(t in vocab for t in (*cls.prefix, "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"))

    def tools_text(self, tools: list[dict]) -> str:
        raise NotImplementedError

    def call_text(self, call) -> str:
        raise NotImplementedError

    def _entries(self, message: Message) -> list[tuple[str, str, bool]]:
        """(metadata, text, text is the message's own) for each `<|assistant|>` message `message` becomes."""
        if message.role != "assistant" or not message.tool_calls:
            return [("", message.content, True)]
        thought = [("", message.content, True)] if message.content else []
        return thought + [(call.name, self.call_text(call), True) for call in message.tool_calls]

    def _body(self, metadata: str, text: str, *, literal: bool = False) -> list[Part]:
        """`literal`: message text that is never cut (the tools: cutting them would leave broken JSON)."""
        # a tool's name on the metadata line is text from the data or a client: never read as a control token
        return [Part(f"{metadata}\n", False, separate=self.separate, literal=bool(metadata)),
                Part(text, not literal, separate=self.separate, literal=literal)]

    @staticmethod
    def _role(message: Message) -> str:
        return "observation" if message.role == "tool" else message.role

    def render(self, messages: list[Message], *, protect: bool = False, tools: list[dict] | None = None) -> list[Segment]:
        segments: list[Segment] = []
        pending = [Part(token, False, special=True) for token in self.prefix]
        if tools:
            pending += [Part("<|system|>", False, special=True)] + self._body("", self.tools_text(tools), literal=True)
        if self.skip_empty:  # GLM-4's template writes no message with empty text
            messages = [m for m in messages if m.content or m.role == "assistant"]
        for i, message in enumerate(messages):
            role = Part(f"<|{self._role(message)}|>", False, special=True)
            after_answer = i > 0 and messages[i - 1].role == "assistant"  # its role token closed that answer
            if message.role != "assistant":
                pending += ([] if after_answer else [role]) + self._body("", message.content)
                continue
            segments.append(Segment(pending + [role]))
            pending = []
            body: list[Part] = []
            for k, (metadata, text, _) in enumerate(self._entries(message)):
                body += ([Part("<|assistant|>", False, special=True)] if k else []) + self._body(metadata, text)
            if i + 1 < len(messages):
                body.append(Part(f"<|{self._role(messages[i + 1])}|>", False, special=True))
            elif self.end_token:
                body.append(Part(self.end_token, False, special=True))
            segments.append(Segment(body, answer=True, trainable=message.trainable))
        if pending:
            segments.append(Segment(pending + [Part("<|assistant|>", False, special=True)]))
        return [Segment([p for p in s.parts if p.text], s.answer, s.trainable) for s in segments]


class ChatGLM3Template(_RoleTokenLayout):
    """ChatGLM3-6B's role-token layout, as its official `build_chat_input` and fine-tuning scripts build it.

    `[gMASK] sop`, then per message its role token, the metadata line and the text, each part tokenized on its own;
    a prompt for generation ends with `<|assistant|>`. A tool call's text is `tool_call(...)` in a python block
    under the tool's name, the tools an English sentence and their JSON in a system message first
    (glmtune.data.tool_format). After the last answer comes eos.
    """

    name = "chatglm3"
    prefix = ("[gMASK]", "sop")
    separate = True

    def tools_text(self, tools: list[dict]) -> str:
        return chatglm3_tools_text(tools)

    def call_text(self, call) -> str:
        return python_call_text(call)


class GLM4Template(_RoleTokenLayout):
    """GLM-4's role-token layout, as its chat template writes a conversation and its fine-tuning script trains
    it: `[gMASK]<sop>`, then per message its role token, the metadata line and the text; a prompt for
    generation ends with `<|assistant|>`. A tool call is the tool's name on the metadata line and the arguments as
    JSON; the tools a Chinese introduction and each function's JSON in a system message first
    (glmtune.data.tool_format). After the last answer comes `<|user|>`, the end token the official script trains.
    """

    name = "glm4"
    prefix = ("[gMASK]", "<sop>")
    end_token = "<|user|>"
    skip_empty = True

    def tools_text(self, tools: list[dict]) -> str:
        return glm4_tools_text(tools)

    def call_text(self, call) -> str:
        return json_call_text(call)


# The layouts a family's table row names (glmtune.families): its own, or its fallback without a chat template.
FAMILY_TEMPLATES = {t.name: t for t in (ChatGLMTemplate, ChatGLM2Template, ChatGLM3Template, GLM4Template)}


def get_template(name: str, tokenizer, family: str = "generic") -> Template:
    """The template called `name` ('auto' picks the family's own layout, else its default layout (GLM-4's, which
    leaves `chat` open) where the tokenizer has that layout's tokens, else the chat template, else plain)."""
    facts = family_facts(family)
    fallback = FAMILY_TEMPLATES[facts.fallback_template] if facts.fallback_template else None
    if fallback is not None and (name == fallback.name or (name == "auto" and fallback.fits(tokenizer))):
        return fallback()
    own = FAMILY_TEMPLATES[facts.template] if facts.template else None
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
    if name in FAMILY_TEMPLATES:
        raise GlmtuneError(f"template {name} is for {name} models only; this is a {family} model (use auto)")
    raise GlmtuneError(f"unknown template {name!r}; use auto, chat or plain")
