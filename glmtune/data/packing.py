"""Packing: several tokenized samples share one training sequence, so no compute goes to padding.

Attention must stay inside each sample and positions must restart per sample, or packing would change
what the model learns. The packed rows carry each sample's length; the collator (PackCollator) turns
those into position ids that restart at 0, which transformers' models read as separate sequences
(with no attention_mask given, a drop in position ids starts a new sequence) and which glmtune's ChatGLM
models read the same way. ChatGLM-6B's layout (2D positions, a bidirectional context) needs a mask per
sample; `glmtune.models.chatglm.modeling.packed_layout` builds it.
"""

from __future__ import annotations

import bisect


def pack_features(features: list[dict[str, list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """Best-fit decreasing: the longest samples first, each into the fullest row it still fits into.
    Returns rows {"input_ids", "labels", "lengths"}; a sample is never split across rows."""
    longest = max((len(f["input_ids"]) for f in features), default=0)
    if longest > capacity:
        raise ValueError(f"a sample of {longest} tokens does not fit a packed row of {capacity}")
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    rows: list[list[int]] = []  # sample indices per row
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in order:
        size = len(features[index]["input_ids"])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - size > 0:
            bisect.insort(free, (room - size, row))
    packed = []
    for members in rows:
        members.sort()  # keep the data's order inside a row
        packed.append({"input_ids": [t for i in members for t in features[i]["input_ids"]],
                       "labels": [t for i in members for t in features[i]["labels"]],
                       "lengths": [len(features[i]["input_ids"]) for i in members]})
    return packed
