"""How many decoder layers recompute their activations in the backward pass (gradient checkpointing).

`gradient_checkpointing: true` recomputes every layer and `false` none. Left unset (auto), the run
recomputes as few layers as keep the estimated peak of its worst training step (glmtune.train.memory) under
`memory_budget`: keeping a layer's activations is faster than rebuilding them, so memory that would go
unused is spent on speed. transformers checkpoints every n-th decoder layer (`every_n_layers`), so the
choices are ceil(layers / n) recomputed layers, for n from the number of layers down to 1.

Default budget: on a GPU its free memory with the loaded model counted back in, minus a margin of 10% of
the card (at least 1 GiB) for the allocator's rounding and the CUDA context; on the CPU 6 GiB or half the
machine's memory, whichever is less (the estimate counts tensors; the process also holds the Python and
PyTorch runtime, about 0.5 GiB more).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from glmtune.data.preprocess import IGNORE_INDEX
from glmtune.train.memory import GIB, estimate_training_memory, model_shape

log = logging.getLogger(__name__)

CPU_BUDGET_GIB = 6.0
GPU_MARGIN_SHARE, GPU_MARGIN_MIN_GIB = 0.10, 1.0


@dataclass(frozen=True)
class RecomputePlan:
    recomputed: int  # decoder layers that recompute their activations
    layers: int  # decoder layers in all
    every_n_layers: int | None  # transformers' setting; None: no checkpointing
    estimate_bytes: int | None  # the worst step's estimated peak with this plan; None: not estimated
    budget_bytes: int | None  # None: the options decided (gradient_checkpointing true or false)
    why: str

    def describe(self) -> str:
        return f"gradient checkpointing on {self.recomputed} of {self.layers} layers: {self.why}"

    def to_dict(self) -> dict:
        return {"recomputed_layers": self.recomputed, "layers": self.layers, "every_n_layers": self.every_n_layers,
                "estimate_bytes": self.estimate_bytes, "budget_bytes": self.budget_bytes, "why": self.why}


def default_budget_gib(device: str) -> tuple[float, str]:
    """The memory a training step may use when memory_budget is not given, and where the figure comes from."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_allocated(device)  # the estimate counts the loaded model itself
        margin = max(GPU_MARGIN_SHARE * total, GPU_MARGIN_MIN_GIB * GIB)
        return (usable - margin) / GIB, "the GPU's free memory minus a 10% margin"
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (AttributeError, OSError, ValueError):
        physical = 2 * CPU_BUDGET_GIB
    return min(CPU_BUDGET_GIB, physical / 2), f"the CPU default ({CPU_BUDGET_GIB:g} GiB or half the memory)"


def worst_batch(features: list[dict], batch_size: int, *, one_row: bool) -> tuple[int, int, int]:
    """(rows, length, labelled positions) of the largest batch the data can make: the longest samples (or
    packed rows) together, each counted with the most labels any has; `one_row`: side by side in one row."""
    lengths = sorted((len(f["input_ids"]) for f in features), reverse=True)[:batch_size]
    labelled = len(lengths) * max(sum(1 for t in f["labels"] if t != IGNORE_INDEX) for f in features)
    if one_row:
        return 1, sum(lengths), labelled
    return len(lengths), lengths[0], labelled


def decoder_layers(model) -> int:
    """The decoder layers transformers can checkpoint one by one (its GradientCheckpointingLayer modules)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer))


def plan_recompute(model, *, requested: bool | None, budget_gib: float | None, device: str,
                   features: list[dict], batch_size: int, one_row: bool, dtype: torch.dtype,
                   weights_dtype: torch.dtype, quantization=None, pre_seq_len: int = 0,
                   optim: str = "adamw_torch", masked: bool | None = None) -> RecomputePlan:
    """What `gradient_checkpointing` (`requested`: True, False or None for auto) comes to for this model,
    data and device. `masked`: whether a mask reaches attention (default: with padding or several samples in
    a row; attention one sample at a time passes none)."""
    checkpointable = decoder_layers(model)  # 0: transformers cannot checkpoint this model layer by layer
    layers = checkpointable or model_shape(model).layers
    if requested is not None:
        return RecomputePlan(layers if requested else 0, layers, 1 if requested else None, None, None,
                             f"gradient_checkpointing {str(requested).lower()}")
    given = budget_gib is not None
    if not given:
        budget_gib, source = default_budget_gib(device)
    else:
        source = "memory_budget"
    budget = int(budget_gib * GIB)
    if not features:
        return RecomputePlan(0, layers, None, None, budget, "no training data to estimate from")
    rows, length, labelled = worst_batch(features, batch_size, one_row=one_row)

    def estimate(recomputed: int) -> int:
        return estimate_training_memory(
            model, batch_size=rows, seq_len=length, labelled=labelled, dtype=dtype, weights_dtype=weights_dtype,
            quantization=quantization, gradient_checkpointing=recomputed, pre_seq_len=pre_seq_len, optim=optim,
            masked=rows > 1 or one_row if masked is None else masked).total

    try:
        kept = estimate(0)
    except (AttributeError, TypeError, ValueError) as e:  # an architecture whose config the estimate cannot read
        return RecomputePlan(0, layers, None, None, budget, f"no memory estimate for this model ({e})")
    where = f"{budget_gib:.1f} GiB, {source}"
    if kept <= budget or not checkpointable:
        return RecomputePlan(0, layers, None, kept, budget,
                             f"the worst step ({rows} x {length} tokens) needs about {kept / GIB:.2f} GiB, within "
                             f"the budget ({where})")
    for every in range(layers, 0, -1):
        recomputed = math.ceil(layers / every)
        needed = estimate(recomputed)
        if needed <= budget or every == 1:
            over = "" if needed <= budget else "; still over the budget with every layer recomputed"
            return RecomputePlan(recomputed, layers, every, needed, budget,
                                 f"the worst step ({rows} x {length} tokens) needs about {kept / GIB:.2f} GiB keeping "
                                 f"every layer, {needed / GIB:.2f} GiB this way; budget {where}{over}")
    raise AssertionError("unreachable")


def checkpointing_arguments(plan: RecomputePlan) -> dict:
    """The TrainingArguments fields for `plan` (non-reentrant checkpointing, as everywhere in glmtune)."""
    if not plan.recomputed:
        return {"activation_checkpointing": False, "activation_checkpointing_kwargs": None}
    kwargs = {"use_reentrant": False}
    if plan.every_n_layers and plan.every_n_layers > 1:
        kwargs["every_n_layers"] = plan.every_n_layers
    return {"activation_checkpointing": True, "activation_checkpointing_kwargs": kwargs}
