"""Batching: pad each batch to its own longest sample (never to a global length)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmtune.data.preprocess import IGNORE_INDEX


@dataclass
class PadCollator:
    """Pads `input_ids` with `pad_id`, `labels` with -100 and builds `attention_mask`.

    `side` is "right" for training and "left" for generation (so every prompt ends where generation
    starts). `multiple_of` rounds the padded length up (e.g. 8 for tensor cores on GPU).
    """

    pad_id: int
    side: str = "right"
    multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple_of:
            longest = -(-longest // self.multiple_of) * self.multiple_of
        batch = {"input_ids": [], "attention_mask": []}
        if "labels" in features[0]:
            batch["labels"] = []
        for f in features:
            n = len(f["input_ids"])
            fill = longest - n
            batch["input_ids"].append(self._pad(list(f["input_ids"]), self.pad_id, fill))
            batch["attention_mask"].append(self._pad([1] * n, 0, fill))
            if "labels" in batch:
                batch["labels"].append(self._pad(list(f["labels"]), IGNORE_INDEX, fill))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    def _pad(self, values: list[int], fill_value: int, count: int) -> list[int]:
        padding = [fill_value] * count
        return padding + values if self.side == "left" else values + padding
