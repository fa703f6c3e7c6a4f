"""One loaded model answering many clients (the API server, the web UI, the terminal chat).

Requests are checked and tokenized by the caller's thread (several at once: nothing is locked, so a long
prompt being tokenized holds up no other request), then wait in a first-in-first-out queue (`max_queue`; beyond
it, Busy). A single worker thread drives a ContinuousBatcher (glmtune.inference.batching): between decoding
steps it lets waiting requests join the batch while they fit (`max_batch` sequences, `max_batch_tokens` of
cache), and a request leaves it at its stop token, a stop string, its length or its cancellation, so
concurrent clients are answered together and never run over each other. Message text is plain text: a
message that spells a control token cannot forge a turn (Encoder). Each request receives its answer as
events: text pieces as they are decoded, then one `Finished` (token counts and why it stopped) or one
`Failed`. A request can be cancelled at any moment (a client that went away): its row leaves the batch at the
next step.

Several served models (adapters over one base, glmtune.inference.adapters): the request's `model` picks one;
each has its own prompt format and prompt template, and their rows share the batch.

Tools (ChatGLM3 and GLM-4): a request may give the functions the model may call. They are written into the
prompt as training wrote them, and the answer is read back: a message whose first line names a tool is a call,
delivered as one `ToolCalled` event once it is complete (text messages still stream as they come), and the
request finishes with "tool_calls". Tool results come back as `tool` messages in the next request.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from glmtune.config import GenerationOptions
from glmtune.data.formats import Message
from glmtune.data.messages import ToolCall, tool_name
from glmtune.data.prompt_template import chat_template_field, fill_message
from glmtune.data.templates import Part, Segment, control_pattern
from glmtune.data.tool_format import TOOL_STYLES, parse_tool_call
from glmtune.errors import GlmtuneError
from glmtune.inference.adapters import ServedModel
from glmtune.inference.batching import (PREFILL_CHUNK, ContinuousBatcher, Sampling, Sequence, StepFailed,
                                        cache_bytes_per_token, default_batch_tokens)
from glmtune.inference.generate import Generator
from glmtune.oom import free_memory, is_out_of_memory, on_cpu, where

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SEEDS = (-(2 ** 63), 2 ** 64 - 1)  # what torch.manual_seed takes
DEFAULT_MAX_BATCH = 32  # sequences decoded together
LONGEST_ANSWER = 2 ** 31 - 1  # max_new_tokens beyond this is refused even where the context length is unknown


class BadRequest(GlmtuneError):
    """A request the engine cannot answer as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Busy(GlmtuneError):
    """The queue is full."""


class UnknownModel(GlmtuneError):
    """A request named a model this server does not serve."""


@dataclass
class ChatRequest:
    messages: list[Message]
    # None: the engine's options, with max_new_tokens cut to what the context has left
    generation: GenerationOptions | None = None
    stop: list[str] = field(default_factory=list)
    # True: generation.max_new_tokens is cut to what the context has left, too, instead of refused
    fit_context: bool = False
    # the functions the model may call (OpenAI's or ChatGLM3's shape): written into the prompt, and the answer read
    # as a call where it is one; None: neither (the model may still be shown earlier calls and their results)
    tools: list[dict] | None = None
    # a tool the answer must call: its name line is put after the prompt, so the model writes only the arguments
    force_tool: str | None = None
    # which served model answers (an adapter's name); None: the first
    model: str | None = None


@dataclass
class Finished:
    prompt_tokens: int
    completion_tokens: int
    # "stop" (stop token or stop string), "length" (max_new_tokens), "tool_calls" (the answer called a tool),
    # "cancelled"
    finish_reason: str


@dataclass
class Failed:
    message: str


@dataclass
class ToolCalled:
    """A tool call in the answer (its id made here, as OpenAI's are); `index` counts the answer's calls from 0."""

    call: ToolCall
    index: int


Event = str | ToolCalled | Finished | Failed


@dataclass
class Job:
    request: ChatRequest
    prompt_ids: list[int]
    generation: GenerationOptions  # the request's, with the answer length it gets
    deliver: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    tool_names: set[str] | None = None  # the answer is read for calls to these (a request with tools)
    served: ServedModel | None = None  # the model (adapter) that answers
    # the worker's: the batch's sequence, the answer read from its tokens, whether Finished/Failed went out
    sequence: Sequence | None = None
    answer: _AnswerText | _ToolAnswer | None = None
    ended: bool = False

    def cancel(self) -> None:
        self.cancelled.set()


class _AnswerText:
    """Turns generated token ids into the answer text piece by piece, as `Generator.generate` would
    return it whole: no leading or trailing whitespace, cut before the first stop string. Text that
    could still become a stop string, or that may be only trailing whitespace, is held back until the
    next tokens decide it."""

    def __init__(self, tokenizer, stop_ids: set[int], stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.generated = 0
        self.emitted = ""
        self.hit_stop_string = False
        self.ended_on_stop_token = False

    def add(self, token: int) -> str:
        """Takes one generated token; returns the new text that is safe to show (maybe empty)."""
        self.generated += 1
        if self.hit_stop_string:
            return ""
        if token in self.stop_ids:
            self.ended_on_stop_token = True
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of its bytes
            return ""
        for stop in self.stop_strings:
            at = text.find(stop)
            if at >= 0:
                self.hit_stop_string = True
                return self._emit(text[:at].rstrip())
        keep = len(text)
        for stop in self.stop_strings:  # hold back a tail that may be the start of a stop string
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    keep = min(keep, len(text) - n)
                    break
        return self._emit(text[:keep].rstrip())

    def raw_text(self) -> str:
        """The text generated so far as decoded, not stripped (a tool call's metadata line shows in it)."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _emit(self, visible: str) -> str:
        if len(visible) <= len(self.emitted) or not visible.startswith(self.emitted):
            return ""
        piece, self.emitted = visible[len(self.emitted):], visible
        return piece

    def finish(self) -> str:
        """The held-back text that turned out not to be a stop string (trailing whitespace is dropped)."""
        if self.hit_stop_string:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        return self._emit(text)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, not counting the stop token that ended the answer."""
        return self.generated - (1 if self.ended_on_stop_token else 0)


class _ToolAnswer:
    """The answer to a request with tools, read as ChatGLM3 and GLM-4 write one: each assistant message starts with a
    metadata line, empty for text and the tool's name for a call (the arguments follow), and a thought before a call,
    or a second call, is a message of its own after another `<|assistant|>` token. Text messages stream as they come
    (the metadata line's newline dropped, as `Generator.generate` strips it); a message whose first line is not empty
    is held back until it ends, then read as a call, or given as text when it does not read as one. Several text
    messages are joined with a newline. Used like _AnswerText: `add` each token, then `finish`."""

    def __init__(self, tokenizer, stop_ids: set[int], stop_strings: list[str], style: str, names: set[str],
                 forced: str | None = None):
        self.new_message = lambda: _AnswerText(tokenizer, stop_ids, stop_strings)
        self.style, self.names = style, names
        token = tokenizer.convert_tokens_to_ids("<|assistant|>")
        self.assistant_id = token if isinstance(token, int) and token != tokenizer.unk_token_id else None
        self.message = self.new_message()
        self.prefix = f"{forced}\n" if forced else ""  # the forced call's name line, in the prompt already
        self.state = "held" if forced else "open"  # open: not known yet; text: streamed; held: maybe a call
        self.calls: list[ToolCall] = []
        self.texts = 0  # text messages given so far
        self.generated = 0

    @property
    def hit_stop_string(self) -> bool:
        return self.message.hit_stop_string

    @property
    def ended_on_stop_token(self) -> bool:
        return self.message.ended_on_stop_token

    @property
    def completion_tokens(self) -> int:
        return self.generated - (1 if self.ended_on_stop_token else 0)

    def add(self, token: int) -> list[str | ToolCalled]:
        """Takes one generated token; returns what may be shown now: text pieces and finished calls."""
        self.generated += 1
        if token == self.assistant_id and not self.message.hit_stop_string:
            out = self._end_message()
            self.message, self.prefix, self.state = self.new_message(), "", "open"
            return out
        piece = self.message.add(token)
        if self.state == "open":
            self.state = self._decide()
            piece = self.message.emitted if self.state == "text" else ""  # all that was held back so far
        return [self._text(piece)] if self.state == "text" and piece else []

    def finish(self) -> list[str | ToolCalled]:
        return self._end_message()

    def _decide(self) -> str:
        """text, held or open, from the message's first line as decoded so far."""
        raw = self.message.raw_text()
        if "\n" not in raw:
            return "open"
        head, rest = raw.split("\n", 1)
        if head.strip():
            return "held"  # a tool's name
        rest = rest.lstrip()
        if not rest:
            return "open"
        # GLM-4 also reads a text answer that is {"name": ..., "arguments": ...} as a call (parse_tool_call)
        return "held" if self.style == "glm4" and rest.startswith("{") else "text"

    def _text(self, piece: str) -> str:
        if self.message.emitted == piece:  # the message's first piece
            self.texts += 1
            if self.texts > 1:
                return "\n" + piece
        return piece

    def _end_message(self) -> list[str | ToolCalled]:
        tail = self.message.finish()
        if self.state == "text":
            return [self._text(tail)] if tail else []
        text = self.message.emitted
        if not self.prefix and not self.message.raw_text().split("\n", 1)[0].strip():
            text = "\n" + text  # the empty metadata line (stripped from `emitted`) says: not a tool's name line
        call = parse_tool_call(self.prefix + text, self.style, self.names)
        if call is not None:
            call.id = f"call_{uuid.uuid4().hex[:24]}"
            self.calls.append(call)
            return [ToolCalled(call, len(self.calls) - 1)]
        shown = (self.prefix + self.message.emitted).strip()  # not a call after all: the text as the model wrote it
        return [self._text_whole(shown)] if shown else []

    def _text_whole(self, text: str) -> str:
        self.texts += 1
        return ("\n" if self.texts > 1 else "") + text


class ChatEngine:
    """Requests checked and queued, answered by one worker thread that drives a ContinuousBatcher. `models`: the
    names served (several adapters over one base, glmtune.inference.adapters); without it, the one `generator`.
    `start()` before use (submit does it), `close()` at the end."""

    def __init__(self, generator: Generator | None = None, *, generation: GenerationOptions | None = None,
                 max_queue: int = 256, prompt_template: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 max_batch_tokens: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 models: list[ServedModel] | None = None):
        if models is None:
            if generator is None:
                raise ValueError("give a generator or served models")
            models = [ServedModel(None, generator, prompt_template)]
        for served in models:
            if served.prompt_template:
                chat_template_field(served.prompt_template)
        self.models = {served.name: served for served in models}
        default = models[0]
        self.generator = default.generator
        self.prompt_template = default.prompt_template
        self.tokenizer = self.generator.tokenizer
        self.context_length = self.generator.context_length
        # what a request that gives no options gets (max_new_tokens: a request that gives no length)
        self.generation = generation or GenerationOptions(max_new_tokens=512)
        self.max_queue = max_queue
        self._controls = control_pattern(self.tokenizer)
        model = self.generator.loaded.model
        self.batcher = ContinuousBatcher(model, stop_ids=self.generator.stop_ids, max_batch=max_batch,
                                         prefill_chunk=prefill_chunk)
        self.cache_bytes_per_token = cache_bytes_per_token(model)
        self.max_batch_tokens = max_batch_tokens or default_batch_tokens(self.cache_bytes_per_token,
                                                                         self.context_length)
        self.batcher.max_tokens = self.max_batch_tokens
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._worker: threading.Thread | None = None
        self.answered = 0
        self.cancelled = 0
        # One prompt now: a fast tokenizer's first call may reset padding/truncation settings saved with it;
        # after that, the concurrent calls of prepare() only read the tokenizer.
        self.generator.prompt_ids([Message("user", "hi")])
        self._heads = {name: shared_head(served.generator) for name, served in self.models.items()}
        self._styles = {name: tool_style(served.generator) for name, served in self.models.items()}
        self.tool_style = self._styles[default.name]  # the first model's (tests and callers of one model read it)

    @property
    def model_names(self) -> list[str | None]:
        return list(self.models)

    # -- requests -------------------------------------------------------------------------------

    def served(self, name: str | None) -> ServedModel:
        """The served model a request's `model` names. With one model any name (or none) is it, as clients often
        send a fixed name; with several, an unknown name is refused (UnknownModel) and none means the first."""
        if len(self.models) == 1 or name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise UnknownModel(f"model {name!r} not found; this server serves "
                               f"{', '.join(repr(n) for n in self.models)}")
        return self.models[name]

    def tools_unsupported(self, served: ServedModel | None = None) -> str | None:
        """Why this model cannot be given tools, or None where it can."""
        served = served or next(iter(self.models.values()))
        if self._styles[served.name] is not None:
            return None
        generator = served.generator
        return (f"tools are supported for ChatGLM3 and GLM-4 models; this model's prompt format "
                f"({generator.template_name}) has no tool-calling format")

    def prepare(self, request: ChatRequest, deliver: Callable[[Event], None]) -> Job:
        """Checks the conversation and tokenizes its prompt; raises BadRequest for what cannot be answered
        (UnknownModel for a model name this server does not serve)."""
        served = self.served(request.model)
        generator = served.generator
        style = self._styles[served.name]
        if not request.messages:
            raise BadRequest("messages must hold at least one message", "messages")
        roles = ROLES if style else ROLES[:3]  # tool results only where tools can be called
        for i, message in enumerate(request.messages):
            if message.role not in roles:
                raise BadRequest(f"messages[{i}].role is {message.role!r}; this model takes "
                                 f"{', '.join(roles)}", f"messages[{i}].role")
        tools = request.tools or None
        self._check_tools(served, request.messages, tools, request.force_tool)
        if request.messages[-1].role not in ("user", "tool"):
            raise BadRequest("the last message must be the user's (or a tool's result): the model answers it",
                             "messages")
        asked = request.generation
        # the HTTP API's names (max_tokens) in what a client is told
        if asked is not None and asked.seed is not None and not SEEDS[0] <= asked.seed <= SEEDS[1]:
            raise BadRequest(f"seed must be between {SEEDS[0]} and {SEEDS[1]}", "seed")
        if asked is not None and not 1 <= asked.max_new_tokens <= LONGEST_ANSWER:
            raise BadRequest(f"max_tokens must be between 1 and {LONGEST_ANSWER}", "max_tokens")
        messages = request.messages
        questions = [i for i, m in enumerate(messages) if m.role == "user"]
        if served.prompt_template and questions:  # the newest question (tool results may follow it)
            messages = list(messages)
            last = questions[-1]
            messages[last] = replace(messages[last], content=fill_message(served.prompt_template,
                                                                          messages[last].content))
        try:
            prompt_ids = generator.prompt_ids(messages, tools=tools)
        except GlmtuneError as e:
            raise BadRequest(str(e), "messages") from None
        if request.force_tool:
            prompt_ids = prompt_ids + generator.answer_start_ids(f"{request.force_tool}\n")
        limit = self.context_length
        if limit is not None and len(prompt_ids) >= limit:
            raise BadRequest(f"the prompt is {len(prompt_ids)} tokens, but this model's context is {limit} tokens; "
                             "shorten the messages", "messages")
        room = limit - len(prompt_ids) if limit is not None else None
        generation = asked or self.generation
        length = generation.max_new_tokens
        if room is not None and (asked is None or request.fit_context):
            length = min(length, room)
        elif room is not None and length > room:
            raise BadRequest(f"this model's context is {limit} tokens: the prompt takes {len(prompt_ids)}, "
                             f"which leaves {room} for the answer, but max_tokens is {length}", "max_tokens")
        # the batch's cache bound: prefix, prompt and answer of one request must fit it on their own
        cache_room = self.max_batch_tokens - served.route.prefix_length - len(prompt_ids)
        if cache_room < 1:
            raise BadRequest(f"the prompt is {len(prompt_ids)} tokens, more than this server's cache holds for one "
                             f"request ({self.max_batch_tokens} tokens, --max-batch-tokens); shorten the messages",
                             "messages")
        if asked is None or request.fit_context:
            length = min(length, cache_room)
        elif length > cache_room:
            raise BadRequest(f"this server's cache holds {self.max_batch_tokens} tokens per request "
                             f"(--max-batch-tokens): the prompt takes {len(prompt_ids)}, which leaves {cache_room} "
                             f"for the answer, but max_tokens is {length}", "max_tokens")
        names = {tool_name(t) for t in tools} if tools else None
        return Job(request, prompt_ids, replace(generation, max_new_tokens=length), deliver, tool_names=names,
                   served=served)

    def _check_tools(self, served: ServedModel, messages: list[Message], tools: list[dict] | None,
                     force: str | None) -> None:
        """Tools, earlier calls and their results only for a model that has a format for them; names (and, in a
        chat template, the tools and arguments, which it writes as it likes) that would read as control tokens
        are refused, since the layouts write them as scaffolding; results and arguments are plain message text."""
        used = [i for i, m in enumerate(messages) if m.role == "tool" or m.tool_calls]
        problem = self.tools_unsupported(served) if tools or force or used else None
        if problem:
            raise BadRequest(problem, "tools" if tools or force else f"messages[{used[0]}]")
        names = [tool_name(t) for t in tools or ()]
        if force is not None and force not in names:
            raise BadRequest(f"tool_choice names {force!r}, which is not among the tools "
                             f"({', '.join(map(str, names)) or 'none given'})", "tool_choice")
        chat_template = served.generator.template_name == "chat"
        for i, tool in enumerate(tools or ()):
            text = json.dumps(tool, ensure_ascii=False) if chat_template else str(tool_name(tool))
            if self._reads_control_tokens(served.generator, text):
                raise BadRequest(f"tools[{i}] spells a control token of this model", f"tools[{i}]")
        for i in used:
            for call in messages[i].tool_calls:
                text = call.as_json() if chat_template else call.name
                if self._reads_control_tokens(served.generator, text):
                    raise BadRequest(f"messages[{i}]: the call of {call.name[:60]!r} spells a control token of "
                                     "this model", f"messages[{i}].tool_calls")
        results = next((n for n, m in enumerate(reversed(messages)) if m.role != "tool"), len(messages))
        calls = len(messages[-results - 1].tool_calls) if results < len(messages) else 0
        if results > calls:
            raise BadRequest("a tool result with no tool call before it", f"messages[{len(messages) - 1}]")
        if 0 < results < calls:  # the model would answer in the missing results' place
            raise BadRequest(f"{calls - results} tool call(s) of the last assistant message have no result; send "
                             "each result as a tool message", "messages")

    def _reads_control_tokens(self, generator: Generator, text: str) -> bool:
        """Whether `text`, written by a template as scaffolding, would yield control tokens, not plain text."""
        if not text or self._controls is None or not self._controls.search(text):
            return False

        def ids(content: bool) -> list[int]:
            return generator.encoder.encode_segment(Segment([Part(text, content)]), split=False, plain=True).ids()

        return ids(False) != ids(True)

    def submit(self, job: Job) -> None:
        self.start()
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise Busy(f"the server is busy ({self.max_queue} requests waiting); try again shortly")
            self._waiting.append(job)
            self._wake.notify()

    def stream(self, request: ChatRequest, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Blocking helper for callers in a thread of their own (the web UI, tests): the events of one request."""
        events: queue.Queue[Event] = queue.Queue()
        job = self.prepare(request, events.put)
        if cancel is not None:
            job.cancelled = cancel
        self.submit(job)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            job.cancel()  # the caller stopped early: its row leaves the batch
            self.wake()

    # -- the worker -----------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._worker is None:
                self._closing = False
                self._worker = threading.Thread(target=self._work, name="glmtune-engine", daemon=True)
                self._worker.start()

    def close(self) -> None:
        with self._lock:
            worker, self._closing = self._worker, True
            self._wake.notify()
        if worker is not None:
            worker.join(timeout=30)
        self._worker = None

    def wake(self) -> None:
        """Lets an idle worker look again (a job was cancelled)."""
        with self._lock:
            self._wake.notify()

    @property
    def waiting(self) -> int:
        """Requests queued, not yet generating."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests generating now (in the batch or being prefilled)."""
        return len(self.batcher.sequences)

    def _work(self) -> None:
        batcher = self.batcher
        while True:
            with self._lock:
                while not self._closing and not batcher.busy and not self._waiting:
                    self._wake.wait()
                if self._closing:
                    break
                admitted = self._admit()
            for job in admitted:
                self._begin(job)
            for sequence in batcher.sequences:
                if sequence.owner.cancelled.is_set():
                    batcher.remove(sequence)
                    self._end(sequence.owner, "cancelled")
            if not batcher.busy:
                continue
            _, failures = batcher.step(self._took)
            for failure in failures:
                self._failed(failure)
        for sequence in batcher.sequences:  # closing: what is still running or waiting ends now
            batcher.remove(sequence)
            self._end(sequence.owner, "cancelled")
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in waiting:
            self._end(job, "cancelled")

    def _admit(self) -> list[Job]:
        """Jobs that join the batch now, in arrival order (the lock is held). Cancelled ones are answered here."""
        admitted = []
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            self.cancelled += 1
            job.deliver(Finished(len(job.prompt_ids), 0, "cancelled"))
        while self._waiting:
            job = self._waiting[0]
            generation = job.generation
            head = self._heads[job.served.name]
            job.sequence = Sequence(job.prompt_ids, generation.max_new_tokens,
                                    Sampling(generation.temperature, generation.top_p, generation.repetition_penalty,
                                             generation.seed), job.served.route, owner=job,
                                    head=len(head) if job.prompt_ids[:len(head)] == head else 0)
            if not self.batcher.fits(job.sequence):
                break
            self._waiting.popleft()
            self.batcher.add(job.sequence)
            admitted.append(job)
        return admitted

    def _begin(self, job: Job) -> None:
        style = self._styles[job.served.name]
        stop_ids = job.served.generator.stop_ids
        if job.tool_names is not None:
            job.answer = _ToolAnswer(self.tokenizer, stop_ids, job.request.stop, style, job.tool_names,
                                     job.request.force_tool)
        else:
            job.answer = _AnswerText(self.tokenizer, stop_ids, job.request.stop)

    def _took(self, sequence: Sequence, token: int) -> None:
        job = sequence.owner
        if job.cancelled.is_set():
            if sequence.finished is None:
                self.batcher.remove(sequence)
            self._end(job, "cancelled")
            return
        self._deliver(job, job.answer.add(token))
        if job.answer.hit_stop_string and sequence.finished is None:
            self.batcher.remove(sequence)
            sequence.finished = "stop"
        if sequence.finished is not None:
            self._deliver(job, job.answer.finish())
            if job.cancelled.is_set():
                reason = "cancelled"
            elif isinstance(job.answer, _ToolAnswer) and job.answer.calls:
                reason = "tool_calls"
            elif job.answer.hit_stop_string or job.answer.ended_on_stop_token:
                reason = "stop"
            else:
                reason = "length"
            self._end(job, reason)

    def _deliver(self, job: Job, events) -> None:
        for event in events if isinstance(events, list) else [events]:
            if event and not job.cancelled.is_set():
                job.deliver(event)

    def _end(self, job: Job, reason: str) -> None:
        if job.ended:
            return
        job.ended = True
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.answered += 1
        completion = job.answer.completion_tokens if job.answer is not None else 0
        job.deliver(Finished(len(job.prompt_ids), completion, reason))

    def _failed(self, failure: StepFailed) -> None:
        error = failure.error
        if not failure.sequences:  # a prefill together ran out of memory: its sequences retry alone
            log.warning("out of memory prefilling several prompts together; prefilling them one by one")
            failure.error = None
            free_memory()
            return
        if is_out_of_memory(error):
            messages = {id(s): self._out_of_memory(s.owner, error) for s in failure.sequences}
            log.warning("%s", next(iter(messages.values())))
        else:
            log.error("generation failed", exc_info=error)
            messages = {id(s): f"generation failed: {type(error).__name__}: {error}" for s in failure.sequences}
        failure.error = None
        free_memory()  # the failed step's tensors are garbage now
        for sequence in failure.sequences:
            job = sequence.owner
            job.ended = True
            job.deliver(Failed(messages[id(sequence)]))

    def _out_of_memory(self, job: Job, error: BaseException) -> str:
        """The message for a request that ran out of memory: its size, and what would make it fit."""
        advice = f"out of memory on {where(error)} answering this request (a {len(job.prompt_ids)}-token prompt, " \
                 f"up to {job.generation.max_new_tokens} new tokens): ask for fewer new tokens (max_tokens; " \
                 "--max-new-tokens in glmtune chat) or send a shorter conversation"
        bits = self.generator.quantization_bit
        if bits != 4 and not on_cpu(error):
            advice += "; a base loaded with --quantization-bit 4 needs less memory"
        return advice


def shared_head(generator: Generator) -> list[int]:
    """The tokens every one-question prompt of this model starts with (the template's head, a default system
    prompt): the common start of two prompts whose questions share no character."""
    first, second = (generator.prompt_ids([Message("user", text)]) for text in ("Q", "字"))
    size = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    return first[:size]


def tool_style(generator: Generator) -> str | None:
    """How `generator`'s model writes tool calls (parse_tool_call's style), or None where its prompt format has no
    tool-calling format: ChatGLM3's and GLM-4's own layouts, and GLM-4's chat template where it renders tools."""
    name = generator.template_name
    if name in TOOL_STYLES:
        return name
    if name == "chat" and generator.family == "glm4":
        source = getattr(generator.tokenizer, "chat_template", None) or ""
        source = source if isinstance(source, str) else "".join(map(str, dict(source).values()))
        return "glm4" if "tools" in source else None
    return None
