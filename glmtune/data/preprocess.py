"""Tokenize conversations into `input_ids` / `labels` with label masking and counted truncation.

Labels are -100 on every prompt token (and, later, on padding); answer tokens and their end-of-sequence
token keep their ids. Each trained answer and the prompt before it form one turn. A turn's prompt is
limited by `max_source_length` and its answer by `max_target_length`; the whole sample by `cutoff_len`,
which prompt and answer share: a short side keeps its length and the long side gets the rest, or, when
both are long, they split it in proportion to their lengths. Truncation cuts a message's own text from
its end and keeps the template's scaffolding (so a cut prompt still ends with the generation prompt and
a cut answer still ends with its end token). Every cut is counted in a TruncationReport.

Message text is plain text in every prompt built for generation (`prompt_ids`: serve, chat, webui, predict,
eval): a control-token string written in a message (`<|im_start|>`, `<|user|>`, `<sop>`) is tokenized as
the characters it is, so only the template can start a turn. Training data follows
`split_special_tokens` (default off: such strings become their control tokens, as Hugging Face chat
templates and the official scripts do). Either way, text that spells no control token is tokenized exactly
as before, in one piece with its scaffolding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from tqdm.auto import tqdm

from glmtune.data.formats import Message, Sample
from glmtune.data.templates import Part, Segment, Template, control_pattern
from glmtune.errors import GlmtuneError

IGNORE_INDEX = -100
TRAIN_ON = ("all_assistant", "last_assistant")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LengthLimits:
    max_source_length: int | None = None
    max_target_length: int | None = None
    cutoff_len: int | None = None

    def describe(self) -> str:
        items = [f"{k}={v}" for k, v in vars(self).items() if v is not None]
        return ", ".join(items) or "no limits"


@dataclass
class TruncationReport:
    samples: int = 0
    samples_cut: int = 0  # samples that lost any token
    prompts_cut: int = 0  # samples whose prompt (some turn's) was cut
    answers_cut: int = 0  # samples whose answer (some turn's) was cut
    turns_dropped: int = 0  # later turns that did not fit at all
    tokens_dropped: int = 0
    examples: list[str] = field(default_factory=list)  # where the first few cuts happened

    def add(self, cut: SampleCut, where: str) -> None:
        self.samples += 1
        if cut.any:
            self.samples_cut += 1
            self.prompts_cut += cut.prompt
            self.answers_cut += cut.answer
            self.turns_dropped += cut.turns_dropped
            self.tokens_dropped += cut.tokens
            if len(self.examples) < 5:
                self.examples.append(where)

    def summary(self, name: str, limits: LengthLimits) -> str:
        if not self.samples_cut:
            return f"{name}: {self.samples} samples, none cut ({limits.describe()})"
        share = 100.0 * self.samples_cut / max(self.samples, 1)
        dropped = f", {self.turns_dropped} later turns dropped" if self.turns_dropped else ""
        return (f"{name}: {self.samples_cut} of {self.samples} samples cut ({share:.1f}%): prompt cut in "
                f"{self.prompts_cut}, answer cut in {self.answers_cut}{dropped}; {self.tokens_dropped} tokens "
                f"dropped ({limits.describe()}). `glmtune data stats` shows limits that cut fewer.")


@dataclass
class SampleCut:
    prompt: bool = False
    answer: bool = False
    turns_dropped: int = 0
    tokens: int = 0

    @property
    def any(self) -> bool:
        return self.prompt or self.answer or self.turns_dropped > 0


@dataclass
class EncodedSegment:
    """A segment's tokens split into parts: (ids, cuttable) in order."""

    parts: list[tuple[list[int], bool]]
    answer: bool
    trainable: bool

    def __len__(self) -> int:
        return sum(len(ids) for ids, _ in self.parts)

    def ids(self) -> list[int]:
        return [t for ids, _ in self.parts for t in ids]


class Encoder:
    """Tokenizes the segments of one template with one tokenizer. Safe to call from several threads at once
    (nothing is locked; the tokenizer is only read)."""

    def __init__(self, tokenizer, template: Template, stop_ids: set[int] | None = None, *,
                 split_special_tokens: bool = False, train_on: str = "all_assistant"):
        if train_on not in TRAIN_ON:
            raise GlmtuneError(f"train_on must be one of {', '.join(TRAIN_ON)}; got {train_on!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no end-of-sequence token")
        self.eos_id = eos
        self.stop_ids = set(stop_ids or ()) | {eos}
        self.split_special_tokens = split_special_tokens  # training data: message text as plain text too
        self._controls = control_pattern(tokenizer)
        self._plain_backend = None  # a copy of a fast tokenizer's backend that reads no special token

    def _tokens(self, text: str) -> list[int]:
        if not text:
            return []
        if getattr(self.tokenizer, "encode_special_tokens", False):
            # a ChatGLM3 tokenizer set to read role tokens out of text: ChatGLM3's own chat format never does
            # (build_chat_input), so a message cannot start a turn of another role
            return self.tokenizer.encode(text, add_special_tokens=False, encode_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _plain_tokens(self, text: str) -> list[int]:
        """`text` tokenized with no special token read out of it."""
        if not text or getattr(self.tokenizer, "encode_special_tokens", False):
            return self._tokens(text)  # (ChatGLM3: see _tokens)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a Python tokenizer: the switch belongs to this call alone
            return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        # A fast tokenizer's split_special_tokens argument flips a flag on its shared backend, which would race
        # with other threads' calls; a private copy with the flag always on does not.
        if self._plain_backend is None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(backend.to_str())
            plain.encode_special_tokens = True
            plain.no_truncation()
            plain.no_padding()
            self._plain_backend = plain
        return self._plain_backend.encode_batch([text], add_special_tokens=False)[0].ids

    def _text_ids(self, run: list[Part], plain: bool) -> list[int]:
        """Consecutive text parts tokenized as one text, as always, unless `plain` and a message's text in
        them spells a control token (or a control token would straddle message text and scaffolding): then
        each part on its own, message text with no special token read out of it."""
        text = "".join(p.text for p in run)
        pattern = self._controls
        if not plain or pattern is None or not pattern.search(text):
            return self._tokens(text)
        written = sum(len(pattern.findall(p.text)) for p in run if not (p.content or p.literal))
        if not written:  # the template wrote no control token here: all of it is text
            return self._plain_tokens(text)
        if len(pattern.findall(text)) == written and not any(pattern.search(p.text) for p in run
                                                              if p.content or p.literal):
            return self._tokens(text)  # every control string here is the template's
        return [t for p in run for t in (self._plain_tokens(p.text) if p.content or p.literal else self._tokens(p.text))]

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no special token {token!r} that the template needs")
        return token_id

    def encode_segment(self, segment: Segment, *, split: bool, plain: bool = False) -> EncodedSegment:
        """Text between special tokens is tokenized whole unless `split` (needed only when the segment
        must be cut); special tokens go in by id. `plain`: message text yields no control token."""
        parts: list[tuple[list[int], bool]] = []
        run: list = []  # consecutive text parts

        def flush():
            if split:
                parts.extend((self._text_ids([p], plain), p.content) for p in run)
            elif run:
                parts.append((self._text_ids(run, plain), any(p.content for p in run)))
            run.clear()

        for part in segment.parts:
            if part.special:
                flush()
                parts.append(([self._special(part.text)], False))
            elif part.separate:
                flush()
                parts.append((self._text_ids([part], plain), part.content))
            else:
                run.append(part)
        flush()
        encoded = EncodedSegment(parts, segment.answer, segment.trainable)
        if segment.answer and not self.stop_ids.intersection(encoded.ids()):
            encoded.parts.append(([self.eos_id], False))
        return encoded

    def prompt_ids(self, messages: list[Message], limits: LengthLimits | None = None,
                   tools: list[dict] | None = None) -> tuple[list[int], bool]:
        """Token ids of the prompt that asks for the next answer, and whether it had to be cut. Message text
        is always plain text here: these prompts carry text from whoever is asking."""
        segments = self.template.render(messages, protect=True, tools=tools)
        ids = [t for s in segments for t in self.encode_segment(s, split=False, plain=True).ids()]
        budget = _min(limits.max_source_length, limits.cutoff_len) if limits else None
        if budget is None or len(ids) <= budget:
            return ids, False
        return _cut_prompt([self.encode_segment(s, split=True, plain=True) for s in segments], budget), True

    def views(self, sample: Sample) -> list[Sample]:
        """The training samples one conversation gives. Under train_on last_assistant only its last answer trains.
        A layout that holds one answer per sample (ChatGLM-6B/2's [Round i] history) gets one sample per trained
        answer, the conversation before it as history, as the official scripts train rows with history."""
        messages = sample.messages
        if self.train_on == "last_assistant":
            last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
            messages = [replace(m, trainable=False) if m.role == "assistant" and i != last else m
                        for i, m in enumerate(messages)]
        trained = [i for i, m in enumerate(messages) if m.role == "assistant" and m.trainable]
        if not self.template.one_answer or len(trained) < 2:
            return [sample if messages is sample.messages else replace(sample, messages=messages)]
        return [replace(sample, messages=messages[: i + 1]) for i in trained]

    def encode(self, sample: Sample, limits: LengthLimits) -> tuple[dict[str, list[int]], SampleCut]:
        """input_ids and labels for a training sample (one of `views`), and what truncation removed."""
        plain = self.split_special_tokens
        turns = _group_turns(self.template.render(sample.messages, protect=plain, tools=sample.tools))
        input_ids: list[int] = []
        labels: list[int] = []
        cut = SampleCut()
        for index, (prompt_segments, answer) in enumerate(turns):
            prompt = [self.encode_segment(s, split=False, plain=plain) for s in prompt_segments]
            target = self.encode_segment(answer, split=False, plain=plain) if answer else None
            src_len = sum(len(s) for s in prompt)
            tgt_len = len(target) if target else 0
            remaining = None if limits.cutoff_len is None else limits.cutoff_len - len(input_ids)
            src_max, tgt_max = _budgets(src_len, tgt_len, remaining, limits)
            if remaining is not None and (src_max < 1 or (target and tgt_max < 1)):
                # No room left for this turn: it and every later turn are dropped whole.
                cut.turns_dropped += len(turns) - index
                cut.tokens += sum(src + tgt for src, tgt in self.lengths(sample)[index:])
                break
            if src_len > src_max:
                cut.prompt, cut.tokens = True, cut.tokens + src_len - src_max
                prompt_ids = _cut_prompt([self.encode_segment(s, split=True, plain=plain) for s in prompt_segments],
                                         src_max)
            else:
                prompt_ids = [tok for s in prompt for tok in s.ids()]
            input_ids += prompt_ids
            labels += [IGNORE_INDEX] * len(prompt_ids)
            if target is None:
                continue
            if tgt_len > tgt_max:
                cut.answer, cut.tokens = True, cut.tokens + tgt_len - tgt_max
                answer_ids = _cut_segment(self.encode_segment(answer, split=True, plain=plain), tgt_max, from_left=False)
            else:
                answer_ids = target.ids()
            input_ids += answer_ids
            labels += answer_ids
        return {"input_ids": input_ids, "labels": labels}, cut

    def lengths(self, sample: Sample) -> list[tuple[int, int]]:
        """(prompt tokens, answer tokens) of each trained turn, before any truncation."""
        plain = self.split_special_tokens
        out = []
        for prompt_segments, answer in _group_turns(self.template.render(sample.messages, protect=plain,
                                                                         tools=sample.tools)):
            src = sum(len(self.encode_segment(s, split=False, plain=plain)) for s in prompt_segments)
            out.append((src, len(self.encode_segment(answer, split=False, plain=plain)) if answer else 0))
        return out


def _min(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _group_turns(segments: list[Segment]) -> list[tuple[list[Segment], Segment | None]]:
    """(prompt segments, trained answer) pairs; untrained answers (history) join the next prompt."""
    turns, pending = [], []
    for segment in segments:
        if segment.answer and segment.trainable:
            turns.append((pending, segment))
            pending = []
        else:
            pending.append(segment)
    if pending:
        turns.append((pending, None))
    return turns


def _budgets(src: int, tgt: int, remaining: int | None, limits: LengthLimits) -> tuple[int, int]:
    """How many prompt and answer tokens this turn may keep."""
    src_max = _min(limits.max_source_length, src) or 0
    tgt_max = _min(limits.max_target_length, tgt) or 0
    if remaining is None or src_max + tgt_max <= remaining:
        return src_max, tgt_max
    if tgt_max <= remaining // 2:
        return remaining - tgt_max, tgt_max
    if src_max <= remaining // 2:
        return src_max, remaining - src_max
    tgt_share = max(1, round(remaining * tgt_max / (src_max + tgt_max)))
    return remaining - tgt_share, tgt_share


def _cut_segment(segment: EncodedSegment, keep: int, *, from_left: bool) -> list[int]:
    """Remove len - keep tokens from the segment's cuttable parts (their ends), scaffolding last."""
    excess = len(segment) - keep
    flat: list[int] = []
    for ids, cuttable in segment.parts:
        removed = min(excess, len(ids)) if cuttable and excess > 0 else 0
        flat += ids[: len(ids) - removed]
        excess -= removed
    if excess > 0:  # scaffolding alone is longer than the budget
        flat = flat[excess:] if from_left else flat[: len(flat) - excess]
    return flat


def _cut_prompt(segments: list[EncodedSegment], keep: int) -> list[int]:
    """Cut a prompt to `keep` tokens: the oldest messages' own text first (each from its end), the newest
    message's text last, the scaffolding never unless nothing else is left."""
    excess = sum(len(s) for s in segments) - keep
    kept: list[int] = []
    for segment in segments:
        take = min(max(excess, 0), sum(len(ids) for ids, cuttable in segment.parts if cuttable))
        kept += _cut_segment(segment, len(segment) - take, from_left=True)
        excess -= take
    return kept[len(kept) - keep:] if len(kept) > keep else kept


def encode_samples(samples: list[Sample], encoder: Encoder, limits: LengthLimits, *, name: str = "data",
                   progress: bool = True) -> tuple[list[dict[str, list[int]]], TruncationReport]:
    """Tokenize a dataset; returns the features and the truncation report (also logged)."""
    report = TruncationReport()
    features = []
    for sample in tqdm(samples, desc=f"tokenizing {name}", disable=not progress, leave=False):
        try:
            for view in encoder.views(sample):
                feature, cut = encoder.encode(view, limits)
                report.add(cut, sample.where)
                features.append(feature)
        except GlmtuneError as e:  # e.g. a conversation the chat template refuses: say which row
            raise GlmtuneError(f"{sample.where}: {e}" if sample.where else str(e)) from None
    return features, report
