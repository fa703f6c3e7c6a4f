"""The P-Tuning v2 prefix encoder: `pre_seq_len` trained vectors that become a key/value prefix per layer.

The native ChatGLM families build it into their model (as the official code does), so official P-Tuning
checkpoints (`transformer.prefix_encoder.*`) load into it by name. Parameter names are the official ones:
`embedding` (and, with projection, the MLP `trans.0` -> tanh -> `trans.2`).
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """prefix token index [batch, pre_seq_len] -> [batch, pre_seq_len, out_width].

    Without projection every prefix position owns its `out_width` vector directly. With projection an
    embedding of `embed_width` goes through a two-layer tanh MLP of `hidden_width` first; ChatGLM-6B uses
    embed_width = hidden_width = hidden_size, ChatGLM2/3 use embed_width = out_width.
    """

    def __init__(self, pre_seq_len: int, out_width: int, *, projection: bool = False,
                 embed_width: int | None = None, hidden_width: int | None = None):
        super().__init__()
        self.pre_seq_len = pre_seq_len
        self.projection = projection
        if projection:
            if embed_width is None or hidden_width is None:
                raise ValueError("a projected prefix needs embed_width and hidden_width")
            self.embedding = nn.Embedding(pre_seq_len, embed_width)
            self.trans = nn.Sequential(nn.Linear(embed_width, hidden_width), nn.Tanh(),
                                       nn.Linear(hidden_width, out_width))
        else:
            self.embedding = nn.Embedding(pre_seq_len, out_width)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        vectors = self.embedding(prefix)
        return self.trans(vectors) if self.projection else vectors

    @torch.no_grad()
    def start_from(self, target: torch.Tensor) -> None:
        """Set the parameters so that the encoder outputs `target` [pre_seq_len, out_width]. Without projection
        that is the embedding itself; with projection the output layer is solved by least squares over the
        MLP's hidden vectors (exact when pre_seq_len is at most the hidden width)."""
        target = target.to(self.embedding.weight)
        if not self.projection:
            self.embedding.weight.copy_(target)
            return
        out = self.trans[2]
        hidden = self.trans[1](self.trans[0](self.embedding.weight))  # [pre_seq_len, hidden_width]
        out.weight.copy_((torch.linalg.pinv(hidden) @ (target - out.bias)).T)
