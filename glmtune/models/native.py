"""Pieces the native ChatGLM families (ChatGLM-6B, ChatGLM2/3) compute the same way."""

from __future__ import annotations

import torch
from torch.nn import CrossEntropyLoss


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official loss: token t predicts token t+1, mean over labelled positions, in fp32."""
    shifted = logits[:, :-1].float()
    return CrossEntropyLoss(ignore_index=-100)(shifted.reshape(-1, shifted.size(-1)),
                                               labels[:, 1:].reshape(-1).to(logits.device))


def layer_prefixes(flat: torch.Tensor, num_layers: int, kv_heads: int, head_dim: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split the prefix encoder's output [batch, pre_seq_len, layers * 2 * kv_heads * head_dim] into each
    layer's (key, value) [batch, kv_heads, pre_seq_len, head_dim]; the official order is layer-major,
    key before value."""
    batch, length = flat.shape[:2]
    kv = flat.reshape(batch, length, 2 * num_layers, kv_heads, head_dim).permute(2, 0, 3, 1, 4)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(num_layers)]
