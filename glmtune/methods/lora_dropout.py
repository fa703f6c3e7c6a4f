"""LoRA's input dropout, one mask per input.

peft gives every adapted projection its own nn.Dropout, so the query and value projections (or the MLP's gate
and up projections), which read the same hidden states, each draw a mask over the whole input and each keep
a dropped copy of it for the backward pass. Here the projections that read one input share one draw: each
projection still sees its input with every element dropped with probability p and the rest scaled by
1 / (1 - p), as before; what changes is that the projections reading the same input see the same mask. The
mask is drawn from uniform floats (`rand >= p`, exact to 2^-24), which costs about half of what CPU
`bernoulli_` does, and the backward pass keeps one bool mask instead of a float one.

Gradient checkpointing replays the same random draws (PyTorch restores the generator's state for the
recomputation), and the draws happen in the same order, so a recomputed layer sees the same masks.
"""

from __future__ import annotations

import torch
from torch import nn


class SharedInputDropout(nn.Module):
    """Dropout whose mask and output are reused while the same input tensor comes back (`shared` is one dict
    for the whole model; it holds the last input and its dropped copy)."""

    def __init__(self, p: float, shared: dict):
        super().__init__()
        self.p = p
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.shared.get("input") is x:
            return self.shared["output"]
        keep = torch.rand(x.shape, device=x.device) >= self.p
        out = torch.where(keep, x * (1.0 / (1.0 - self.p)), torch.zeros((), dtype=x.dtype, device=x.device))
        self.shared["input"], self.shared["output"] = x, out
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, mask shared by the projections that read the same input"


def share_input_dropout(model) -> int:
    """Replace every LoRA layer's nn.Dropout with a SharedInputDropout of the same p, all sharing one cache;
    returns how many were replaced."""
    shared: dict = {}
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                dropouts[name] = SharedInputDropout(dropout.p, shared)
                replaced += 1
    return replaced
