"""How a loaded model keeps packed samples apart: the layout function glmtune.data.collate.PackCollator
lays each packed row out with, chosen by the family table's `packing` fact."""

from __future__ import annotations

from typing import Callable

from glmtune.data.collate import restarting_positions
from glmtune.errors import GlmtuneError
from glmtune.families import PACK_CHATGLM, PACK_TRANSFORMERS, family_facts


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
        if not getattr(model, "_supports_attention_backend", False) or implementation not in ("sdpa", "eager"):
            raise GlmtuneError(f"packing needs a model whose attention keeps packed samples apart (transformers' "
                               f"sdpa or eager attention); {type(model).__name__} with {implementation} attention "
                               "cannot: train without packing")
    return restarting_positions
