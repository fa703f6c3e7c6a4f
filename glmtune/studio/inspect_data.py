"""What the studio page shows about a data file before training: its format and counts, the token length
statistics `glmtune data stats --json` gives, and the first rows exactly as the model will see them.

The file is read with the same functions as training (glmtune.data.formats.load_samples: a bad file raises
its GlmtuneError listing every problem as `file:line: ...`, unchanged, before any tokenizer loads), and
tokenized with training's template, stop tokens and encoder. A preview row is the encoded sample decoded in
runs of trained tokens (label kept) and prompt tokens (label IGNORE_INDEX), so what is marked trained is
exactly what the loss is computed on. preview_html escapes every text: rows are user data.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from glmtune.data.preprocess import IGNORE_INDEX, Encoder, LengthLimits


class PreviewSegment(NamedTuple):
    text: str
    trained: bool  # the loss is computed on these tokens (labels kept)


@dataclass
class PreviewRow:
    line: int  # the row's line in the source file (JSONL), or where its record starts (a JSON array)
    segments: list[PreviewSegment]  # the whole encoded sample, in order; joined, the decoded input ids
    cut: bool = False  # the length limits cut this sample
    view: int = 0  # which training sample of the row (ChatGLM-6B/2 layouts train each answer as its own)


@dataclass
class DataFacts:
    path: Path
    format: str  # the detected row format's name (context/target, alpaca, conversations, ...)
    samples: int  # rows read
    trained_answers: int  # assistant answers the loss is computed on (under train_on)
    tool_calls: int  # tool calls written in assistant messages
    stats: dict[str, Any]  # as `glmtune data stats --json` gives them (glmtune.data.stats.stats_dict)
    samples_cut: int  # training samples the limits cut (of stats["samples"])
    template: str  # the prompt format used
    limits: LengthLimits  # the limits the stats, cut counts and preview are for
    preview: list[PreviewRow] = field(default_factory=list)


def default_limits() -> LengthLimits:
    """Training's default limits (TrainConfig: cutoff_len only)."""
    from glmtune.config import TrainConfig
    from glmtune.train.recipe import length_limits

    return length_limits(TrainConfig())


def trained_answers(messages, train_on: str) -> int:
    """The answers of one conversation that train: every trainable assistant message, or under
    last_assistant only the last assistant message (when it is trainable), as Encoder.views decides."""
    answers = [m for m in messages if m.role == "assistant"]
    if train_on == "last_assistant":
        return int(bool(answers) and answers[-1].trainable)
    return sum(m.trainable for m in answers)


def inspect_data(path, model: str, *, template: str = "auto", limits: LengthLimits | None = None,
                 prompt_column: str | None = None, response_column: str | None = None,
                 prompt_template: str | None = None, train_on: str = "all_assistant",
                 preview_rows: int = 3) -> DataFacts:
    """Facts about the data file `path` for training `model` (a checkpoint folder or the default alias).
    `limits` None: training's defaults. The first `preview_rows` rows are previewed."""
    from glmtune.data.formats import load_samples
    from glmtune.data.stats import length_stats, stats_dict
    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_tokenizer
    from glmtune.train.dry_run import training_stop_ids

    samples, fmt = load_samples(path, prompt_column=prompt_column, response_column=response_column,
                                prompt_template=prompt_template)  # before the tokenizer: a bad file first
    limits = limits if limits is not None else default_limits()
    tokenizer, family, model_path = load_tokenizer(model)
    layout = get_template(template, tokenizer, family)
    encoder = Encoder(tokenizer, layout, training_stop_ids(tokenizer, family, model_path), train_on=train_on)
    stats = length_stats(samples, encoder, limits)
    limited = any(v is not None for v in vars(limits).values())
    return DataFacts(
        path=Path(path), format=fmt.name, samples=len(samples),
        trained_answers=sum(trained_answers(s.messages, train_on) for s in samples),
        tool_calls=sum(len(m.tool_calls) for s in samples for m in s.messages),
        stats=stats_dict(stats), samples_cut=stats.cut_at[limits.describe()] if limited else 0,
        template=layout.name, limits=limits,
        preview=[row for s in samples[:max(preview_rows, 0)] for row in preview_sample(s, encoder, limits)])


def preview_sample(sample, encoder: Encoder, limits: LengthLimits) -> list[PreviewRow]:
    """The training samples one row gives, each encoded as training encodes it and decoded in runs."""
    from glmtune.errors import GlmtuneError

    line = _line_of(sample.where)
    rows = []
    try:
        for index, view in enumerate(encoder.views(sample)):
            feature, cut = encoder.encode(view, limits)
            rows.append(PreviewRow(line, decode_runs(encoder.tokenizer, feature["input_ids"], feature["labels"]),
                                   cut.any, index))
    except GlmtuneError as e:  # e.g. a conversation the chat template refuses: say which row
        raise GlmtuneError(f"{sample.where}: {e}" if sample.where else str(e)) from None
    return rows


def _line_of(where: str) -> int:
    """The line number of a Sample's `file:line`."""
    number = where.rsplit(":", 1)[-1]
    return int(number) if number.isdigit() else 0


def decode_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[PreviewSegment]:
    """`input_ids` as text, in runs of trained and untrained tokens. A special token is written by its name
    (the ChatGLM tokenizers' decode drops [gMASK], <sop>, </s> and <eop> even when asked to keep them, yet
    the model sees them and some are trained). The text between special tokens is decoded whole and cut where
    decoding each prefix gives a prefix of it, so its runs join to exactly that text (decoding a run alone
    can differ at its edges: SentencePiece drops a leading space, a character split across tokens decodes
    as U+FFFD); where that does not hold, each run is decoded alone."""
    named = _special_names(tokenizer, input_ids)
    pieces: list[PreviewSegment] = []
    stretch: list[tuple[int, bool]] = []
    for token_id, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if token_id in named:
            pieces += _decode_stretch(tokenizer, stretch)
            stretch = []
            pieces.append(PreviewSegment(named[token_id], trained))
        else:
            stretch.append((token_id, trained))
    pieces += _decode_stretch(tokenizer, stretch)
    segments: list[PreviewSegment] = []
    for piece in pieces:  # neighbours of one kind are one segment
        if segments and segments[-1].trained == piece.trained:
            segments[-1] = PreviewSegment(segments[-1].text + piece.text, piece.trained)
        elif piece.text:
            segments.append(piece)
    return segments


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _special_names(tokenizer, input_ids: list[int]) -> dict[int, str]:
    """The ids among `input_ids` to write by name: the tokenizer's special and control tokens, and any token
    whose decoding alone is empty though its name is not blank (ChatGLM-6B's [gMASK])."""
    from glmtune.data.templates import control_tokens

    special = set(tokenizer.all_special_ids)
    special.update(tokenizer.convert_tokens_to_ids(t) for t in control_tokens(tokenizer))
    names = {}
    for token_id in set(input_ids):
        name = tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(name, str):
            continue
        if token_id in special or (name.strip("\u2581 ") and not _decode(tokenizer, [token_id])):
            names[token_id] = name
    return names


def _decode_stretch(tokenizer, stretch: list[tuple[int, bool]]) -> list[PreviewSegment]:
    """Ordinary tokens between special ones, decoded whole and cut into runs of one kind."""
    if not stretch:
        return []
    ids = [t for t, _ in stretch]
    bounds = [0] + [i for i in range(1, len(stretch)) if stretch[i][1] != stretch[i - 1][1]] + [len(stretch)]
    whole = _decode(tokenizer, ids)
    offsets = [0]
    for end in bounds[1:-1]:
        prefix = _decode(tokenizer, ids[:end])
        if not whole.startswith(prefix) or len(prefix) < offsets[-1]:
            return [PreviewSegment(_decode(tokenizer, ids[a:b]), stretch[a][1]) for a, b in zip(bounds, bounds[1:])]
        offsets.append(len(prefix))
    offsets.append(len(whole))
    return [PreviewSegment(whole[offsets[k]:offsets[k + 1]], stretch[a][1]) for k, a in enumerate(bounds[:-1])]


PREVIEW_STYLE = ("white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace; "
                 "margin: 0 0 1em 0")


def preview_html(rows: list[PreviewRow], *, heading: str = "line {line}", cut_note: str = "cut") -> str:
    """The rows as HTML: each headed by its line number (`heading`, a format string with {line}; the page's
    words), trained text in <mark class="trained">, prompt text plain, newlines kept. Every text is escaped."""
    out = ['<div class="glmtune-preview">']
    for row in rows:
        title = heading.format(line=row.line) + (f" ({cut_note})" if row.cut else "")
        body = "".join(f'<mark class="trained">{html.escape(s.text)}</mark>' if s.trained else html.escape(s.text)
                       for s in row.segments)
        out.append(f'<div class="row{" cut" if row.cut else ""}"><div class="line">{html.escape(title)}</div>'
                   f'<div class="sample" style="{PREVIEW_STYLE}">{body}</div></div>')
    out.append("</div>")
    return "\n".join(out)
