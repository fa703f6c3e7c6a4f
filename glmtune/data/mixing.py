"""Several training files mixed into one training set: `train_file: [task.jsonl, general.jsonl:0.3]`.

Fine-tuned on a narrow task alone, a model forgets how to chat; the usual cure is to mix general
conversations into the training data (docs/data.md#mixing-data-against-forgetting). Each entry of
train_file is a file with at most one number:

- none (`task.jsonl`): the file is taken whole;
- a whole number N (`general.jsonl:300`, `{path: general.jsonl, samples: 300}`): exactly N samples from it;
- a weight w, 0 < w < 1 (`general.jsonl:0.3`, `{path: general.jsonl, weight: 0.3}`): the file makes up the
  share w of the mixed set. With F samples from the files taken whole or by count and weights adding up to
  W < 1, it gives round(F * w / (1 - W)) samples: task.jsonl (700 rows) + general.jsonl:0.3 gives 300.

N samples from a file of R rows are N distinct rows drawn at random when N <= R; when N > R every row is
taken N // R times and the remaining N % R are drawn (the log says so). The draws and the shuffle of the
mixed set are seeded by the run's `seed`, each file's draw by the seed and its own path, so the same
options give the same samples in the same order, and changing one file's number leaves the others' rows
as they were. `max_train_samples` keeps the first N samples of the shuffled mix.

A file is read with its own format. prompt_column, response_column and prompt_template describe
single-turn rows: in a mix they apply to the files whose first row is single-turn, and a `messages` /
`conversations` file is read as it is. A single file without a number is read exactly as before mixing
existed: same samples, same order, same dataset cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glmtune.data.cache import encode_cached
from glmtune.data.formats import Sample, detect_format, load_samples
from glmtune.data.preprocess import IGNORE_INDEX, Encoder, LengthLimits, TruncationReport
from glmtune.errors import GlmtuneError, shown
from glmtune.files import loads, raw_decode, short, status

log = logging.getLogger(__name__)

OPTION = "train_file"
KEYS = ("path", "weight", "samples")  # of a mapping entry
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # a `path:NUMBER` suffix
WHOLE_NUMBER = re.compile(r"[+-]?\d+")
COLUMN_OPTIONS = ("prompt_column", "response_column", "prompt_template")
FORMS = "give a path, path:N (N samples), path:W (a share W between 0 and 1) or {path, weight | samples}"


@dataclass(frozen=True)
class DataSource:
    """One entry of train_file."""
    path: str
    weight: float | None = None  # the file's share of the mixed set, 0 < weight < 1
    samples: int | None = None  # exactly this many samples from the file

    @property
    def rule(self) -> str:
        if self.weight is not None:
            return f"weight {self.weight:g}"
        return f"{self.samples} samples" if self.samples is not None else "whole"


# ---------------------------------------------------------------------------------------------
# Parsing: every form of train_file, every mistake one line that names the option


def parse_train_file(value: Any, option: str = OPTION) -> list[DataSource]:
    """The files of a train_file value (a path, `path:N`, `path:W`, a mapping, or a list of those); []
    for None. GlmtuneError, naming `option`, for anything that cannot be meant."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise GlmtuneError(f"{option} is an empty list; give at least one file")
    sources = [_entry(item, option) for item in items]
    seen: dict[str, str] = {}
    for source in sources:
        key = os.path.normpath(source.path)
        if key in seen:
            raise GlmtuneError(f"{option} lists {shown(source.path)} twice; give each file once (with a number of "
                               f"samples, path:N, to repeat its rows)")
        seen[key] = source.path
    weighted = [s for s in sources if s.weight is not None]
    if weighted and len(weighted) == len(sources):
        raise GlmtuneError(f"{option}: every file has a weight, but a weight is a share of the mixed set sized "
                           "by the files taken whole or by a number of samples; give at least one file without a "
                           "weight (e.g. [task.jsonl, general.jsonl:0.3])")
    total = sum(s.weight for s in weighted)
    if total >= 1 - 1e-9:
        raise GlmtuneError(f"{option}: the weights add up to {total:g}; they are shares of the mixed set and must "
                           "add up to less than 1 (the rest is the files taken whole or by number)")
    return sources


def _entry(item: Any, option: str) -> DataSource:
    if isinstance(item, dict):
        return _mapping(item, option)
    if not isinstance(item, str):
        raise GlmtuneError(f"{option}: {shown(item)} is not a file name; {FORMS} (put a path YAML reads as a "
                           "number in quotes)")
    if not item.strip():
        raise GlmtuneError(f"{option}: an empty file name; {FORMS}")
    # Split at the last ':' only when a number follows, so C:\data\x.jsonl and a:b.jsonl stay paths.
    path, colon, suffix = item.rpartition(":")
    if colon and path.strip() and NUMBER.fullmatch(suffix.strip()):
        return _numbered(path.rstrip(), suffix.strip(), option, item)
    if item.rstrip().endswith(":"):
        raise GlmtuneError(f"{option}: {shown(item)} has nothing after ':'; {FORMS}")
    return DataSource(item)


def _numbered(path: str, suffix: str, option: str, text: str) -> DataSource:
    if WHOLE_NUMBER.fullmatch(suffix):
        return DataSource(path, samples=_samples(int(suffix), option, text))
    return DataSource(path, weight=_weight(float(suffix), option, text, path))


def _samples(value: int, option: str, where: str) -> int:
    if value < 1:
        raise GlmtuneError(f"{option}: {shown(where)}: a number of samples must be at least 1, got {value} "
                           "(leave the file out to use none of it)")
    return value


def _weight(value: float, option: str, where: str, path: str) -> float:
    if not math.isfinite(value) or value <= 0 or value >= 1:
        hint = (f"; for {int(value)} sample{'s' if value != 1 else ''} write {path}:{int(value)} (a whole number)"
                if math.isfinite(value) and value >= 1 and value.is_integer() else "")
        raise GlmtuneError(f"{option}: {shown(where)}: a weight is the file's share of the mixed set and must be "
                           f"between 0 and 1 (not included), got {value:g}{hint}")
    return value


def _mapping(item: dict, option: str) -> DataSource:
    unknown = [k for k in item if k not in KEYS]
    if unknown:
        raise GlmtuneError(f"{option}: unknown key {shown(unknown[0])} in {shown(item)}; a file's mapping takes "
                           f"{', '.join(KEYS)}")
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        raise GlmtuneError(f"{option}: {shown(item)} needs path: the file's name")
    weight, samples = item.get("weight"), item.get("samples")
    if weight is not None and samples is not None:
        raise GlmtuneError(f"{option}: {shown(item)} gives both weight and samples; give one of them")
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, int):
            raise GlmtuneError(f"{option}: {shown(item)}: samples must be a whole number, got {shown(samples)}")
        return DataSource(path, samples=_samples(samples, option, path))
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise GlmtuneError(f"{option}: {shown(item)}: weight must be a number between 0 and 1, got "
                               f"{shown(weight)}")
        return DataSource(path, weight=_weight(float(weight), option, path, path))
    return DataSource(path)


def check_train_file(value: Any, source: str) -> None:
    """config.py's check of the option (the files themselves are read when training starts)."""
    parse_train_file(value, f"{source}: {OPTION}")


def train_paths(value: Any) -> list[str]:
    """The file names in a train_file value (for the commands that must not write over their inputs)."""
    return [s.path for s in parse_train_file(value)]


def is_plain(sources: list[DataSource]) -> bool:
    """One file without a number: read exactly as before mixing existed (in file order, not shuffled)."""
    return len(sources) == 1 and sources[0].weight is None and sources[0].samples is None


# ---------------------------------------------------------------------------------------------
# Reading and drawing


@dataclass
class Part:
    """One file of the mix."""
    source: DataSource
    samples: list[Sample]  # every row of the file
    format: str
    read_with: dict[str, Any]  # the column options it was read with (part of its dataset cache key)


@dataclass
class Mixture:
    parts: list[Part]
    order: list[tuple[int, int]]  # (part, row) of each training sample, in training order
    seed: int
    plain: bool = False  # one file without a number, in its own order (is_plain)

    def samples(self) -> list[Sample]:
        return [self.parts[p].samples[r] for p, r in self.order]


def plan_counts(sources: list[DataSource], rows: list[int]) -> list[int]:
    """How many samples each file gives: all its rows, its number, or its weight's share of the mix."""
    fixed = sum(n if s.samples is None else s.samples for s, n in zip(sources, rows) if s.weight is None)
    rest = 1 - sum(s.weight for s in sources if s.weight is not None)
    counts = []
    for source, n in zip(sources, rows):
        if source.weight is not None:
            counts.append(math.floor(fixed * source.weight / rest + 0.5))  # rounded half up, as the docs say
        else:
            counts.append(n if source.samples is None else source.samples)
    return counts


def draw(rows: int, count: int, rng: random.Random) -> list[int]:
    """`count` row indices of a file of `rows`: distinct rows when they suffice, else every row count // rows
    times and the rest drawn distinct, so no row comes up more than once more than another."""
    whole, rest = divmod(count, rows)
    return [i for _ in range(whole) for i in range(rows)] + sorted(rng.sample(range(rows), rest))


def _first_row(path: Path) -> Any:
    """The first record of a JSONL or JSON-array file, or None when it cannot be read (load_samples then
    says what is wrong). A JSONL file is read only up to its first record."""
    try:
        with path.open("rb") as f:
            for raw in f:
                line = raw.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
                if not line:
                    continue
                if not line.startswith("["):
                    return loads(line)
                text = path.read_bytes().decode("utf-8", errors="replace")
                start = text.index("[") + 1
                return raw_decode(json.JSONDecoder(), text, start + len(text[start:]) - len(text[start:].lstrip()))[0]
    except (OSError, ValueError):
        return None
    return None


def _is_conversation_file(path: Path) -> bool:
    row = _first_row(path)
    if not isinstance(row, dict):
        return False
    try:
        return detect_format(row).conversation is not None
    except GlmtuneError:
        return False


def _check_exists(path: str) -> None:
    """A missing file of a mix named with the option, and a `:` suffix that is not a number said as such."""
    if status(path) is not None:
        return
    head, colon, suffix = path.rpartition(":")
    if colon and head and status(head) is not None:
        raise GlmtuneError(f"{OPTION}: {shown(path)}: {shown(suffix)} after ':' is not a number; {FORMS}")
    comma = ("; to mix files give each as its own value (--train-file a.jsonl b.jsonl, or a YAML list)"
             if "," in path else "")
    raise GlmtuneError(f"{OPTION}: data file not found: {short(path)}{comma}")


def load_mixture(value: Any, *, read_with: dict[str, Any], seed: int, max_samples: int | None = None) -> Mixture:
    """Read every file of train_file `value` and draw the mixed set (see the module's docstring)."""
    sources = parse_train_file(value)
    if not sources:
        raise GlmtuneError("train_file is required (a JSON or JSONL file; see `glmtune data validate`)")
    if is_plain(sources):
        path = sources[0].path
        if ("," in path or ":" in path) and status(path) is None:  # a.jsonl,b.jsonl or a.jsonl:x, said as such
            _check_exists(path)
        samples, fmt = load_samples(path, **read_with)
        used = min(len(samples), max_samples) if max_samples else len(samples)
        return Mixture([Part(sources[0], samples, fmt.name, read_with)], [(0, i) for i in range(used)], seed, True)
    for source in sources:  # every name checked before any file is read
        _check_exists(source.path)
    parts, plain_options = [], {k: None for k in COLUMN_OPTIONS}
    for source in sources:
        # column options describe single-turn rows: a messages / conversations file is read as it is
        conversations = any(read_with.get(k) for k in COLUMN_OPTIONS) and _is_conversation_file(Path(source.path))
        options = plain_options if conversations else dict(read_with)
        samples, fmt = load_samples(source.path, **options)
        parts.append(Part(source, samples, fmt.name, options))
    given = [k for k in COLUMN_OPTIONS if read_with.get(k)]
    if given and all(p.read_with is plain_options for p in parts):
        raise GlmtuneError(f"{', '.join(given)} describe(s) single-turn rows, and every file of train_file holds "
                           "messages / conversations rows, which write every message out: leave it unset")
    counts = plan_counts(sources, [len(p.samples) for p in parts])
    order = []
    for index, (part, count) in enumerate(zip(parts, counts)):
        rows = len(part.samples)
        picks = (list(range(rows)) if part.source.weight is None and part.source.samples is None
                 else draw(rows, count, random.Random(f"glmtune-mix:{seed}:{part.source.path}")))
        order += [(index, r) for r in picks]
        if count == 0:
            log.warning("train_file: %s (%s) gives no samples: its share of %d samples rounds to 0",
                        part.source.path, part.source.rule, sum(counts))
        elif count > rows:
            log.info("train_file: %s (%s) gives %d samples from %d rows: each row %d or %d times", part.source.path,
                     part.source.rule, count, rows, count // rows, -(-count // rows))
    random.Random(f"glmtune-mix:{seed}").shuffle(order)
    if max_samples and max_samples < len(order):
        log.info("max_train_samples: the first %d of the %d shuffled samples of the mix", max_samples, len(order))
        order = order[:max_samples]
    return Mixture(parts, order, seed)


# ---------------------------------------------------------------------------------------------
# Tokenizing, and each file's share of what trains


@dataclass
class FileShare:
    path: str
    rule: str  # whole, N samples, weight W
    format: str  # the row format it was read as
    rows: int  # rows in the file
    rows_used: int  # distinct rows in the mixed set
    samples: int  # samples in the mixed set (a repeated row counts each time)
    tokens: int  # their tokens, after the length limits
    trained_tokens: int  # of those, the ones the loss is computed on (labels not -100)
    samples_cut: int  # of its distinct rows, the ones the length limits cut
    tokens_dropped: int  # tokens those cuts dropped
    sample_share: float = 0.0  # of the mixed set's samples
    token_share: float = 0.0
    trained_share: float = 0.0


@dataclass
class MixReport:
    seed: int
    samples: int
    tokens: int
    trained_tokens: int
    files: list[FileShare] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The share table, for the log and `--dry-run`."""
        width = max(len(Path(f.path).name) for f in self.files)
        lines = [f"train_file mix (seed {self.seed}): {self.samples:,} samples, {self.tokens:,} tokens, "
                 f"{self.trained_tokens:,} trained"]
        for f in self.files:
            repeated = f", rows repeated ({f.rows_used} distinct)" if f.samples > f.rows_used else ""
            cut = f"{f.samples_cut} of its rows cut" if f.samples_cut else "none cut"
            lines.append(f"  {Path(f.path).name:<{width}}  {f.rule:<12} {f.samples:>7,} samples "
                         f"({f.sample_share:6.1%}) of {f.rows:,} rows{repeated}; {f.tokens:,} tokens "
                         f"({f.token_share:.1%}), {f.trained_tokens:,} trained ({f.trained_share:.1%}); {cut}")
        return lines


def _rows_key(rows: list[int]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def encode_mixture(mixture: Mixture, encoder: Encoder, limits: LengthLimits, *, key_extra: dict[str, Any],
                   enabled: bool = True, progress: bool = True
                   ) -> tuple[list[dict[str, list[int]]], TruncationReport, MixReport | None]:
    """(features in training order, the truncation report, each file's share; None for one plain file).

    Each file's distinct rows in the mix are tokenized once, through the dataset cache: a file taken whole
    (or its first rows) keys as a single-file run on it does, drawn rows add their indices to the key,
    which so follows the numbers, the seed and the files' sizes."""
    if mixture.plain:
        part = mixture.parts[0]
        samples = part.samples[: len(mixture.order)]
        features, report, _ = encode_cached(part.source.path, samples, encoder, limits, name="train",
                                            key_extra=key_extra, enabled=enabled, progress=progress)
        return features, report, None
    report, by_part = TruncationReport(), []
    for index, part in enumerate(mixture.parts):
        used = sorted({r for p, r in mixture.order if p == index})
        extra = {**key_extra, **part.read_with}
        if used != list(range(len(used))):
            extra["rows"] = _rows_key(used)
        features, part_report = ([], TruncationReport()) if not used else encode_cached(
            part.source.path, [part.samples[r] for r in used], encoder, limits,
            name=f"train ({Path(part.source.path).name})", key_extra=extra, enabled=enabled,
            progress=progress)[:2]
        by_part.append((_by_row(used, features, [part.samples[r] for r in used], encoder), part_report))
        for name, value in asdict(part_report).items():
            if name != "examples":
                setattr(report, name, getattr(report, name) + value)
        report.examples += part_report.examples[: 5 - len(report.examples)]
    features = [feature for p, r in mixture.order for feature in by_part[p][0][r]]
    return features, report, _shares(mixture, by_part)


def _by_row(rows: list[int], features: list[dict], samples: list, encoder: Encoder) -> dict[int, list[dict]]:
    """Each row's features: one, or one per trained answer where the layout holds one answer per sample
    (Encoder.views, which tokenizes nothing)."""
    out, at = {}, 0
    for row, sample in zip(rows, samples):
        count = len(encoder.views(sample))
        out[row], at = features[at: at + count], at + count
    return out


def _shares(mixture: Mixture, by_part: list[tuple[dict[int, dict], TruncationReport]]) -> MixReport:
    times = Counter(mixture.order)
    files = []
    for index, (part, (features, part_report)) in enumerate(zip(mixture.parts, by_part)):
        tokens = trained = 0
        for row, row_features in features.items():
            for feature in row_features:
                tokens += times[index, row] * len(feature["input_ids"])
                trained += times[index, row] * sum(label != IGNORE_INDEX for label in feature["labels"])
        files.append(FileShare(part.source.path, part.source.rule, part.format, len(part.samples), len(features),
                               sum(times[index, row] for row in features), tokens, trained,
                               part_report.samples_cut, part_report.tokens_dropped))
    mix = MixReport(mixture.seed, len(mixture.order), sum(f.tokens for f in files),
                    sum(f.trained_tokens for f in files), files)
    for f in files:
        f.sample_share = f.samples / max(mix.samples, 1)
        f.token_share = f.tokens / max(mix.tokens, 1)
        f.trained_share = f.trained_tokens / max(mix.trained_tokens, 1)
    return mix
