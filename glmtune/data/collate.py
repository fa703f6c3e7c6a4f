"""Batching: pad each batch to its own longest sample (never to a global length), or to a fixed length
where a recipe asks for one (the tutorials' recipe in `glmtune bench`); packed rows of samples; and
padding-free batches (a batch's samples side by side in one row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from glmtune.data.preprocess import IGNORE_INDEX

# Key of the batch's real (non-padding) token count; the trainer takes it out before the model sees the batch.
REAL_TOKENS = "glmtune_real_tokens"
# Key of each token's sample length ([rows, sequence], 0 for padding), written with REAL_TOKENS for NEFTune's
# noise scale (glmtune.train.neftune); also taken out before the model sees the batch.
SAMPLE_LENGTHS = "glmtune_sample_lengths"


@dataclass
class PadCollator:
    """Pads `input_ids` with `pad_id`, `labels` with -100 and builds `attention_mask`.

    `side` is "right" for training and "left" for generation (so every prompt ends where generation
    starts). `multiple_of` rounds the padded length up (e.g. 8 for tensor cores on GPU); `fixed_length`
    pads every batch to that length. `count_tokens` adds the number of real tokens under REAL_TOKENS.
    """

    pad_id: int
    side: str = "right"
    multiple_of: int | None = None
    fixed_length: int | None = None
    count_tokens: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple_of:
            longest = -(-longest // self.multiple_of) * self.multiple_of
        if self.fixed_length:
            longest = max(longest, self.fixed_length)
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
        tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if self.count_tokens:
            tensors[REAL_TOKENS] = torch.tensor(sum(len(f["input_ids"]) for f in features))
            tensors[SAMPLE_LENGTHS] = tensors["attention_mask"] * tensors["attention_mask"].sum(1, keepdim=True)
        return tensors

    def _pad(self, values: list[int], fill_value: int, count: int) -> list[int]:
        padding = [fill_value] * count
        return padding + values if self.side == "left" else values + padding


def restarting_positions(input_ids: torch.Tensor, lengths: list[list[int]]) -> dict[str, torch.Tensor]:
    """Position ids counting from 0 in every sample; the padding after a row's last sample counts as one
    more sample, so it is kept apart too. Without an attention_mask, a drop in position ids is where
    transformers' models (and glmtune's ChatGLM2/3) start a new sequence."""
    rows = []
    for row_lengths in lengths:
        pieces = [torch.arange(n) for n in row_lengths]
        tail = input_ids.shape[1] - sum(row_lengths)
        if tail:
            pieces.append(torch.arange(tail))
        rows.append(torch.cat(pieces))
    return {"position_ids": torch.stack(rows)}


@dataclass
class PackCollator:
    """Batches packed rows (see glmtune.data.packing): pads them to the longest row and lays out
    positions (and, where the model needs one, an attention mask) so that no sample sees another.
    `layout(input_ids, lengths)` returns those extra inputs; the default restarts positions per sample.

    `one_row`: the padding-free batch. The batch's samples (plain or packed rows) go side by side into a single
    row with no padding at all, so a step trains on exactly the samples, and the loss, of the padded batch
    the sampler drew."""

    pad_id: int
    layout: Callable[[torch.Tensor, list[list[int]]], dict[str, torch.Tensor]] = restarting_positions
    count_tokens: bool = False
    one_row: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.one_row:
            rows = [{"input_ids": [t for r in rows for t in r["input_ids"]],
                     "labels": [t for r in rows for t in r["labels"]],
                     "lengths": [n for r in rows for n in (r.get("lengths") or [len(r["input_ids"])])]}]
        longest = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        # a plain sample (the dev set is never packed) is a row of one
        lengths = [list(r.get("lengths") or [len(r["input_ids"])]) for r in rows]
        for i, row in enumerate(rows):
            input_ids[i, :len(row["input_ids"])] = torch.tensor(row["input_ids"])
            row_labels = torch.tensor(row["labels"])
            # A sample's first token is predicted from nothing when it stands alone; packed, it would be the
            # previous sample's last token's target. No such target is trained.
            row_labels[torch.tensor(lengths[i]).cumsum(0)[:-1]] = IGNORE_INDEX
            labels[i, :len(row["labels"])] = row_labels
        batch = {"input_ids": input_ids, "labels": labels, **self.layout(input_ids, lengths)}
        if self.count_tokens:
            batch[REAL_TOKENS] = torch.tensor(sum(sum(n) for n in lengths))
            sample_lengths = torch.zeros_like(input_ids)
            for i, row in enumerate(lengths):
                sample_lengths[i, :sum(row)] = torch.repeat_interleave(torch.tensor(row), torch.tensor(row))
            batch[SAMPLE_LENGTHS] = sample_lengths
        return batch
