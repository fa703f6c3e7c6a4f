"""Attention one sample at a time in packed and padding-free rows, for transformers' models.

A row that holds several samples side by side keeps them apart with a block-diagonal mask. SDPA computes
that mask's whole square, rows x rows, although only the samples' own triangles count: for four samples of
200 tokens that is four times the work, and a masked call also rules out the fused kernels. The collator
(glmtune.data.collate.PackCollator) writes where each sample starts as `cu_seq_lens_q` / `cu_seq_lens_k`
(cumulative lengths over the flattened batch, the names transformers' flash-attention path reads), the model
passes them to its attention function as keyword arguments, and `glmtune_segment_sdpa` runs causal SDPA on
each sample's slice with no mask. Without them (evaluation, generation, any padded batch) it is transformers'
own sdpa attention, mask and all.
"""

from __future__ import annotations

import torch

NAME = "glmtune_segment_sdpa"


def _segment_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    batch, _, length, _ = query.shape
    if starts is None or key.shape[2] != length:  # not a packed training row (or a cache is in use)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bounds = starts.tolist()
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        row, begin = divmod(start, length)  # the offsets count over the flattened batch
        stop = begin + (end - start)
        piece, _ = sdpa_attention_forward(module, query[row:row + 1, :, begin:stop], key[row:row + 1, :, begin:stop],
                                          value[row:row + 1, :, begin:stop], None, dropout=dropout, scaling=scaling,
                                          is_causal=True, **kwargs)
        pieces.append(piece)  # [1, piece length, heads, head_dim]
    return torch.cat(pieces, dim=1).reshape(batch, length, *pieces[0].shape[2:]), None


def register() -> None:
    """Register `glmtune_segment_sdpa` with transformers, with sdpa's mask maker (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _segment_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_segment_attention(model) -> bool:
    """Switch a transformers model that runs sdpa attention to `glmtune_segment_sdpa`; False where it runs
    another attention (it then keeps the block-diagonal mask, as before)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not getattr(
            model, "_supports_attention_backend", False):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


def segment_offsets(lengths: list[list[int]], row_length: int) -> torch.Tensor:
    """`cu_seq_lens` for rows of `row_length` holding samples of `lengths` (each row's unused tail counts as
    one more segment, so every position belongs to one)."""
    offsets, at = [0], 0
    for row in lengths:
        for n in list(row) + ([row_length - sum(row)] if row_length > sum(row) else []):
            at += n
            offsets.append(at)
    return torch.tensor(offsets, dtype=torch.int32)
