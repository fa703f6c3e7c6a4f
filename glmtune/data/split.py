"""`glmtune data split`: a reproducible train/dev split of one data file.

The same file, ratio and seed always give the same split. Rows keep their original order inside each
part and are written unchanged (as JSONL).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from glmtune.data.formats import read_records
from glmtune.errors import GlmtuneError
from glmtune.files import check_output_file, replacing_all


def split_file(path: str | Path, *, dev_ratio: float, seed: int, output_dir: str | Path | None = None,
               overwrite: bool = False) -> tuple[Path, Path, int, int]:
    """Writes STEM.train.jsonl and STEM.dev.jsonl; returns their paths and row counts."""
    if not 0 < dev_ratio < 1:
        raise GlmtuneError(f"dev_ratio must be between 0 and 1 (exclusive); got {dev_ratio}")
    path = Path(path)
    out = Path(output_dir) if output_dir else path.parent
    stem = path.name.removesuffix(".jsonl").removesuffix(".json")
    train_path, dev_path = out / f"{stem}.train.jsonl", out / f"{stem}.dev.jsonl"
    for target in (train_path, dev_path):  # both, before reading the data and before writing either
        check_output_file(target, overwrite=overwrite, inputs=[path], option="output")
    numbered = read_records(path)
    for line, value in numbered:  # rows are copied as they are, but a row that is no object is no sample
        if not isinstance(value, dict):
            raise GlmtuneError(f"{path}:{line}: each record must be a JSON object, got {type(value).__name__}")
    records = [value for _, value in numbered]
    if len(records) < 2:
        raise GlmtuneError(f"{path}: {len(records)} row(s) cannot be split into train and dev")
    dev_count = min(max(1, round(len(records) * dev_ratio)), len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    dev_rows = set(order[:dev_count])
    # Both parts are written whole before either replaces its file: a failure leaves both files as they were.
    with replacing_all([train_path, dev_path]) as (train, dev):
        for index, record in enumerate(records):
            (dev if index in dev_rows else train).write(json.dumps(record, ensure_ascii=False) + "\n")
    return train_path, dev_path, len(records) - dev_count, dev_count
