"""A disk cache for tokenized datasets, so that a second run on the same data skips preprocessing.

An entry is keyed by everything the tokens depend on: the data file's bytes, the tokenizer, the template,
the encoder's end tokens, the length limits, how many samples are used and what the caller adds (e.g. the
column names). It lives in `cache_dir()/datasets/<key>.npz`. The cache only ever saves time: an entry
that cannot be read is encoded again, and a folder that cannot be written (GLMTUNE_CACHE naming a file, a
read-only place) only costs a warning, given before any model loads (`dataset_cache_usable`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from glmtune.data.formats import Sample
from glmtune.data.preprocess import Encoder, LengthLimits, TruncationReport, encode_samples
from glmtune.files import writable_folder_problem
from glmtune.paths import cache_dir

CACHE_FORMAT = 1  # bump when preprocessing changes what it produces for the same inputs
# The files a tokenizer is built from (tokenizer_config.json among them).
TOKENIZER_FILES = ("tokenizer*.json", "tokenizer*.model", "*.model", "vocab*", "merges*", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*")
log = logging.getLogger(__name__)


def dataset_cache_usable() -> bool:
    """Whether tokenized data can be cached: tried for real (a folder and a temporary file in it), with a
    warning when not, so that a run says so at its start and then simply goes on without the cache."""
    folder = cache_dir() / "datasets"
    problem = writable_folder_problem(folder)
    if problem:
        log.warning("not caching tokenized data: %s (set GLMTUNE_CACHE to a writable folder, or dataset_cache: "
                    "false to silence this)", problem)
    return problem is None


def encode_cached(source: str | Path, samples: list[Sample], encoder: Encoder, limits: LengthLimits, *,
                  name: str = "data", key_extra: dict | None = None, enabled: bool = True,
                  progress: bool = True) -> tuple[list[dict[str, list[int]]], TruncationReport, bool]:
    """`encode_samples(samples, encoder, limits)` through the cache: (features, report, hit).

    `samples` must come from `source` (all of its rows or the first N); `key_extra` names whatever else
    shaped them (column names, ...), as JSON-able values."""
    if not enabled:
        return (*encode_samples(samples, encoder, limits, name=name, progress=progress), False)
    try:
        path = cache_dir() / "datasets" / f"{_key(source, len(samples), encoder, limits, key_extra)}.npz"
    except OSError as e:  # the data file itself cannot be read again: nothing to key on
        log.warning("not caching the tokenized %s data: %s", name, e)
        return (*encode_samples(samples, encoder, limits, name=name, progress=progress), False)
    if _is_file(path):
        cached = _load(path, samples)
        if cached is not None:
            log.info("tokenized %s data loaded from cache (%s)", name, path)
            return (*cached, True)
    features, report = encode_samples(samples, encoder, limits, name=name, progress=progress)
    _save(path, features, report, samples)
    return features, report, False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a GLMTUNE_CACHE name too long: no entry to read; saving will warn
        return False


def _key(source: str | Path, count: int, encoder: Encoder, limits: LengthLimits, key_extra: dict | None) -> str:
    """The file's content (not its path or mtime, so a copied or touched file still hits) and the rest."""
    import transformers  # its tokenization code may change between versions

    material = {
        "format": CACHE_FORMAT,
        "source": _file_hash(Path(source)),
        "samples": count,
        "tokenizer": _tokenizer_fingerprint(encoder.tokenizer),
        "template": _template_identity(encoder.template),
        "eos": encoder.eos_id,
        "stop": sorted(encoder.stop_ids),
        "limits": dataclasses.asdict(limits),
        "extra": key_extra or {},
        "transformers": transformers.__version__,
    }
    if encoder.split_special_tokens:  # (only then: earlier entries keep their keys)
        material["split_special_tokens"] = True
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> dict:
    """What the tokenizer's output depends on: its files when it was loaded from a folder, else its vocabulary;
    plus what can be changed in memory after loading (added tokens, special tokens, chat template)."""
    files = {}
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if str(folder) and folder.is_dir():
        for file in sorted(folder.iterdir()):
            if file.is_file() and any(fnmatch(file.name, pattern) for pattern in TOKENIZER_FILES):
                files[file.name] = _file_hash(file)
    fingerprint = {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "files": files,
    }
    if not files:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        fingerprint["vocab"] = hashlib.sha256(vocab.encode()).hexdigest()
    return fingerprint


def _template_identity(template) -> str:
    """Name and options, without anything that differs between processes (no object addresses): a
    dataclass's repr, else the class and its plain-valued attributes (ChatTemplate's tokenizer is left out;
    its chat template is part of the tokenizer's fingerprint)."""
    if dataclasses.is_dataclass(template):
        return f"{template.name}:{template!r}"
    options = {k: v for k, v in sorted(vars(template).items()) if isinstance(v, (str, int, float, bool, type(None)))}
    return f"{template.name}:{type(template).__module__}.{type(template).__qualname__}:{options}"


def _save(path: Path, features: list[dict[str, list[int]]], report: TruncationReport, samples: list[Sample]) -> None:
    """Write through a temporary file and os.replace, so that a killed run never leaves half an entry."""
    input_ids = [t for f in features for t in f["input_ids"]]
    labels = [t for f in features for t in f["labels"]]
    dtype = np.int64 if input_ids and max(input_ids) >= 2**31 else np.int32
    offsets = np.cumsum([0] + [len(f["input_ids"]) for f in features], dtype=np.int64)
    fields = dataclasses.asdict(report)
    # Examples are "file:line" of cut samples; keep their sample indices so that a copied file reports its own path.
    fields["examples"] = _example_indices(report.examples, samples)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.savez(f, input_ids=np.asarray(input_ids, dtype=dtype), labels=np.asarray(labels, dtype=dtype),
                     offsets=offsets, report=np.asarray(json.dumps(fields)))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the tokenized data cache %s (%s); going on without it", path, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _example_indices(examples: list[str], samples: list[Sample]) -> list[int]:
    """The index of each example's sample (examples are in sample order)."""
    indices, start = [], 0
    for where in examples:
        start = next(i for i in range(start, len(samples)) if samples[i].where == where)
        indices.append(start)
        start += 1
    return indices


def _load(path: Path, samples: list[Sample]) -> tuple[list[dict[str, list[int]]], TruncationReport] | None:
    """The cached features and report, or None (logged) when the entry is unreadable or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as data:
            input_ids, labels, offsets = data["input_ids"], data["labels"], data["offsets"]
            fields = json.loads(str(data["report"]))
        if (len(offsets) != len(samples) + 1 or offsets[0] != 0 or offsets[-1] != len(input_ids)
                or len(labels) != len(input_ids) or np.any(np.diff(offsets) < 0) or fields["samples"] != len(samples)):
            raise ValueError("its arrays do not match the samples")
        fields["examples"] = [samples[i].where for i in fields["examples"]]
        report = TruncationReport(**fields)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with an entry, encoding again fixes it
        log.info("ignoring the unreadable tokenized data cache %s (%s: %s)", path, type(e).__name__, e)
        return None
    bounds = offsets.tolist()
    ids, labs = input_ids.tolist(), labels.tolist()
    features = [{"input_ids": ids[a:b], "labels": labs[a:b]} for a, b in zip(bounds, bounds[1:])]
    return features, report
