"""One loaded model answering many clients (the API server and the web UI).

Requests are checked and tokenized by the caller's thread (several at once: nothing is locked, so a long
prompt being tokenized holds up no other request), then wait in a first-in-first-out queue; a single worker
thread generates for one request at a time, so concurrent clients never run over each other on the same
model. Message text is plain text: a message that spells a control token cannot forge a turn (Encoder). Each request receives its answer as events: text pieces as they are decoded, then one
`Finished` (token counts and why it stopped) or one `Failed`. A request can be cancelled at any moment (a
client that went away): generation stops at the next token.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from glmtune.config import GenerationOptions
from glmtune.data.formats import Message
from glmtune.data.prompt_template import chat_template_field, fill_message
from glmtune.errors import GlmtuneError
from glmtune.inference.generate import Generator
from glmtune.oom import free_memory, is_out_of_memory, on_cpu, where

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SEEDS = (-(2 ** 63), 2 ** 64 - 1)  # what torch.manual_seed takes
LONGEST_ANSWER = 2 ** 31 - 1  # max_new_tokens beyond this is refused even where the context length is unknown


class BadRequest(GlmtuneError):
    """A request the engine cannot answer as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Busy(GlmtuneError):
    """The queue is full."""


@dataclass
class ChatRequest:
    messages: list[Message]
    # None: the engine's options, with max_new_tokens cut to what the context has left
    generation: GenerationOptions | None = None
    stop: list[str] = field(default_factory=list)
    # True: generation.max_new_tokens is cut to what the context has left, too, instead of refused
    fit_context: bool = False


@dataclass
class Finished:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop token or stop string), "length" (max_new_tokens), "cancelled"


@dataclass
class Failed:
    message: str


Event = str | Finished | Failed


@dataclass
class Job:
    request: ChatRequest
    prompt_ids: list[int]
    generation: GenerationOptions  # the request's, with the answer length it gets
    deliver: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

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


class ChatEngine:
    """Queue and worker around one Generator. `start()` before use, `close()` at the end."""

    def __init__(self, generator: Generator, *, generation: GenerationOptions | None = None, max_queue: int = 256,
                 prompt_template: str | None = None):
        self.generator = generator
        # the newest user message is filled into it, as training filled each row's own (last) question
        self.prompt_template = prompt_template
        if prompt_template:
            chat_template_field(prompt_template)
        self.tokenizer = generator.tokenizer
        self.context_length = generator.context_length
        # what a request that gives no options gets (max_new_tokens: a request that gives no length)
        self.generation = generation or GenerationOptions(max_new_tokens=512)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._worker: threading.Thread | None = None
        self.answered = 0
        self.cancelled = 0
        # One prompt now: a fast tokenizer's first call may reset padding/truncation settings saved with it;
        # after that, the concurrent calls of prepare() only read the tokenizer.
        generator.prompt_ids([Message("user", "hi")])

    # -- requests -------------------------------------------------------------------------------

    def prepare(self, request: ChatRequest, deliver: Callable[[Event], None]) -> Job:
        """Checks the conversation and tokenizes its prompt; raises BadRequest for what cannot be answered."""
        if not request.messages:
            raise BadRequest("messages must hold at least one message", "messages")
        for i, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise BadRequest(f"messages[{i}].role is {message.role!r}; this model takes "
                                 f"{', '.join(ROLES)}", f"messages[{i}].role")
        if request.messages[-1].role != "user":
            raise BadRequest("the last message must be the user's: the model answers it", "messages")
        asked = request.generation
        # the HTTP API's names (max_tokens) in what a client is told
        if asked is not None and asked.seed is not None and not SEEDS[0] <= asked.seed <= SEEDS[1]:
            raise BadRequest(f"seed must be between {SEEDS[0]} and {SEEDS[1]}", "seed")
        if asked is not None and not 1 <= asked.max_new_tokens <= LONGEST_ANSWER:
            raise BadRequest(f"max_tokens must be between 1 and {LONGEST_ANSWER}", "max_tokens")
        messages = request.messages
        if self.prompt_template:
            messages = messages[:-1] + [Message("user", fill_message(self.prompt_template, messages[-1].content))]
        try:
            prompt_ids = self.generator.prompt_ids(messages)
        except GlmtuneError as e:
            raise BadRequest(str(e), "messages") from None
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
        return Job(request, prompt_ids, replace(generation, max_new_tokens=length), deliver)

    def submit(self, job: Job) -> None:
        self.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"the server is busy ({self._queue.maxsize} requests waiting); try again shortly") from None

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
            job.cancel()  # the caller stopped early: free the model for the next request

    # -- the worker -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="glmtune-engine", daemon=True)
            self._worker.start()

    def close(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=30)
            self._worker = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.cancelled += 1
                job.deliver(Finished(len(job.prompt_ids), 0, "cancelled"))
                continue
            failure = None
            try:
                finished = self._generate(job)
                if finished.finish_reason == "cancelled":
                    self.cancelled += 1
                else:
                    self.answered += 1
                job.deliver(finished)
            except Exception as e:  # one failed request must not take the server down
                if is_out_of_memory(e):
                    failure = self._out_of_memory(job, e)
                    log.warning("%s", failure)
                else:
                    log.exception("generation failed")
                    failure = f"generation failed: {type(e).__name__}: {e}"
            if failure is not None:
                free_memory()  # out of the except block: the failed request's tensors are garbage now
                job.deliver(Failed(failure))

    def _out_of_memory(self, job: Job, error: BaseException) -> str:
        """The message for a request that ran out of memory: its size, and what would make it fit."""
        advice = f"out of memory on {where(error)} answering this request (a {len(job.prompt_ids)}-token prompt, " \
                 f"up to {job.generation.max_new_tokens} new tokens): ask for fewer new tokens (max_tokens; " \
                 "--max-new-tokens in glmtune chat) or send a shorter conversation"
        bits = self.generator.quantization_bit
        if bits != 4 and not on_cpu(error):
            advice += "; a base loaded with --quantization-bit 4 needs less memory"
        return advice

    def _generate(self, job: Job) -> Finished:
        answer = _AnswerText(self.tokenizer, self.generator.stop_ids, job.request.stop)

        def on_token(token: int) -> None:
            piece = answer.add(token)
            if piece and not job.cancelled.is_set():
                job.deliver(piece)

        if job.generation.seed is not None:
            torch.manual_seed(job.generation.seed)
        self.generator.stream(job.prompt_ids, job.generation, on_token,
                              should_stop=lambda: job.cancelled.is_set() or answer.hit_stop_string)
        tail = answer.finish()
        if tail and not job.cancelled.is_set():
            job.deliver(tail)
        if job.cancelled.is_set():
            reason = "cancelled"
        elif answer.hit_stop_string or answer.ended_on_stop_token:
            reason = "stop"
        else:
            reason = "length"
        return Finished(len(job.prompt_ids), answer.completion_tokens, reason)
