"""Defaults that depend on the size of the model, worked out once the model is built (loaded for training,
on the meta device for `--dry-run`).

The learning rate: small models need a much higher one than 6B-9B models. Each method's rule is a straight
line in log-log between two anchors, flat outside them: a rate measured on the default model, and the rate
the 6B-9B recipes use.
- LoRA and QLoRA: 2e-3 at 135M parameters (docs/benchmarks.md, "Defaults: quality on the tutorials' multi-task
  set": rank 16 on every linear layer, alpha 32; measured with plain and with rsLoRA scaling; plain LoRA at
  4e-3 was a little better, at 8e-3 worse, both behind rsLoRA at 2e-3); 2e-4 at 7B, the QLoRA paper's rate for
  7B and 13B models with LoRA on every linear layer and the common rate for ChatGLM-6B/GLM-4-9B LoRA; never
  below 1e-4 (the QLoRA paper's rate for 33B and 65B models), which the line reaches at about 23B.
- P-Tuning v2: 5e-2 at 135M (the best of 5e-3, 2e-2 and 5e-2 in docs/benchmarks.md, "LoRA variants and
  P-Tuning settings"); 2e-2 at 6.2B, the official ChatGLM-6B ptuning/ recipe, and 2e-2 above.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from glmtune.config import TrainConfig

log = logging.getLogger(__name__)

# (parameters, learning rate) anchors of each method's rule, and its lowest rate
LORA_RULE = ((135e6, 2e-3), (7e9, 2e-4), 1e-4)
PTUNING_RULE = ((135e6, 5e-2), (6.2e9, 2e-2), 2e-2)


def default_learning_rate(method: str, parameters: int) -> float:
    (n0, lr0), (n1, lr1), lowest = PTUNING_RULE if method == "ptuning" else LORA_RULE
    slope = math.log(lr1 / lr0) / math.log(n1 / n0)
    rate = lr0 * (max(parameters, n0) / n0) ** slope
    return float(f"{max(rate, lowest):.2g}")  # two significant digits: a number a user can read and type


def base_parameter_count(model) -> int:
    """Parameters of the base model as trained in full precision: a quantized layer counts its unpacked
    weight (in x out), not the packed int8 storage (ChatGLM's int4 holds two weights per element,
    bitsandbytes' 4-bit likewise)."""
    total, seen = 0, set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]  # tied weights count once
        seen.update(id(p) for p in own)
        weight = getattr(module, "weight", None)
        quantized = weight is not None and not weight.is_floating_point()
        if quantized and own and hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += module.in_features * module.out_features + sum(p.numel() for p in own if p is not weight)
        else:
            total += sum(p.numel() for p in own)
    return total


def with_size_defaults(cfg: TrainConfig, args, base_model) -> TrainConfig:
    """`cfg` (and the training arguments `args`) with the learning rate for this model when none was given."""
    if cfg.learning_rate is not None:
        return cfg
    parameters = base_parameter_count(base_model)
    rate = default_learning_rate(cfg.method, parameters)
    log.info("learning rate %g: the %s default for a model of %.2gB parameters (docs/training.md#defaults)",
             rate, "P-Tuning v2" if cfg.method == "ptuning" else "LoRA", parameters / 1e9)
    args.learning_rate = rate
    return replace(cfg, learning_rate=rate)
