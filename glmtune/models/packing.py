"""How a loaded model keeps packed samples apart: the layout function glmtune.data.collate.PackCollator
lays each packed row out with, chosen by the family table's `packing` fact."""

from __future__ import annotations

from typing import Callable

import torch

from glmtune.data.collate import restarting_positions
from glmtune.errors import GlmtuneError
from glmtune.families import PACK_CHATGLM, PACK_TRANSFORMERS, family_facts
from glmtune.models.segment_attention import NAME as SEGMENT_ATTENTION, segment_offsets


def packing_layout(family: str, model) -> Callable:
    """ChatGLM-6B gets its own 2D positions and mask per sample; ChatGLM2/3 read restarting positions
    themselves; transformers' models read them only through their shared mask code, and older ones would let
    packed samples see each other, so they are refused."""
    kind = family_facts(family).packing
    if kind == PACK_CHATGLM:
        from glmtune.models.chatglm.modeling import packed_layout

        return packed_layout(model.config)
    if kind == PACK_TRANSFORMERS:
        implementation = getattr(model.config, "_attn_implementation", None)
        # P-Tuning's prefix wraps sdpa or eager; segment attention is sdpa one sample at a time
        inner = (implementation or "").removeprefix("glmtune_prefix_").replace(SEGMENT_ATTENTION, "sdpa")
        if not getattr(model, "_supports_attention_backend", False) or inner not in ("sdpa", "eager"):
            raise GlmtuneError(f"{type(model).__name__} with {implementation} attention cannot keep samples apart "
                               "in one sequence (packed and padding-free batches need transformers' sdpa or eager "
                               "attention)")
    return restarting_positions_and_segments


def restarting_positions_and_segments(input_ids: torch.Tensor, lengths: list[list[int]]) -> dict:
    """Restarting positions, plus where each sample starts (flash-attention's varlen arguments), which
    glmtune.models.segment_attention and transformers' flash attention use to attend one sample at a time;
    other attention functions ignore them (ChatGLM2/3 and transformers' mask code read the positions)."""
    offsets = segment_offsets(lengths, input_ids.shape[1])
    longest = int(offsets.diff().max())
    return {**restarting_positions(input_ids, lengths), "cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets,
            "max_length_q": longest, "max_length_k": longest}
