"""Fine-tuning methods. Each has `parameters`, `apply` (make a model trainable), `save` and `load`."""

from __future__ import annotations

from glmtune.errors import GlmtuneError
from glmtune.methods.lora import LoraMethod, QLoraMethod
from glmtune.methods.ptuning import PTuningMethod

METHODS = {"lora": LoraMethod, "qlora": QLoraMethod, "ptuning": PTuningMethod}


def get_method(name: str):
    if name not in METHODS:
        raise GlmtuneError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]()
