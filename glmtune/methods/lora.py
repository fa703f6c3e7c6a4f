"""LoRA through peft: low-rank updates on chosen linear layers, the base frozen. QLoRA is the same over a
base that bitsandbytes quantized to 4-bit NF4 (or 8 bits) while loading (glmtune.models.kbit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError, one_line

# Default target modules per family; the generic family uses peft's own per-architecture defaults.
FAMILY_TARGETS = {
    "chatglm": ["query_key_value"],
    "chatglm2": ["query_key_value"],
    "chatglm3": ["query_key_value"],
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def target_modules(option: str, family: str) -> list[str] | str | None:
    if option == "auto":
        return FAMILY_TARGETS.get(family)  # None: peft picks by model_type
    if option == "all-linear":
        return "all-linear"
    names = [n.strip() for n in option.split(",") if n.strip()]
    if not names:
        raise GlmtuneError("lora_target is empty; use auto, all-linear or comma-separated module names")
    return names


class LoraMethod:
    name = "lora"

    def parameters(self, options, family: str) -> dict[str, Any]:
        return {"rank": options.lora_rank, "alpha": options.lora_alpha, "dropout": options.lora_dropout,
                "target": options.lora_target}

    def apply(self, model, options, family: str):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                            target_modules=target_modules(options.lora_target, family), task_type="CAUSAL_LM")
        _fit_quantized(model, config)
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise GlmtuneError(f"cannot apply LoRA ({e}); set lora_target to module names of this model, "
                               "or all-linear") from None

    def save(self, model, directory: Path) -> None:
        model.save_pretrained(directory)
        (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model card template, not ours

    def load(self, model, directory: Path, info: dict[str, Any]):
        """The base with the adapter merged in, for generation."""
        from peft import LoraConfig, PeftModel

        from glmtune.models.loader import load_errors

        try:
            config = _fit_quantized(model, LoraConfig.from_pretrained(directory))
            adapted = PeftModel.from_pretrained(model, directory, is_trainable=False, config=config)
        except load_errors() as e:
            raise GlmtuneError(f"cannot load the LoRA adapter in {directory}: {one_line(e)}") from None
        return self.for_inference(adapted)

    def for_inference(self, model):
        """Fold the low-rank updates into the base weights: same outputs, and generation no longer pays
        for two extra small matmuls in every adapted layer at every step. Over a quantized base the
        adapter stays separate (merging into int weights would round the update away)."""
        from glmtune.models.kbit import is_bitsandbytes_model
        from glmtune.models.quantization import has_quantized_modules

        if has_quantized_modules(model) or is_bitsandbytes_model(model.get_base_model()):
            return model
        return model.merge_and_unload()


class QLoraMethod(LoraMethod):
    """LoRA whose base was loaded quantized by bitsandbytes (the trainer asks the loader for it); the
    adapter is an ordinary LoRA adapter and also loads over the full-precision base."""

    name = "qlora"

    def apply(self, model, options, family: str):
        from glmtune.models.kbit import is_bitsandbytes_model

        if not is_bitsandbytes_model(model):
            raise GlmtuneError("method qlora needs a base loaded through bitsandbytes (quantization_bit 4 or 8)")
        return super().apply(model, options, family)


def _fit_quantized(model, config):
    """Over quantized layers, peft must use the LoRA layer that refuses to merge into int weights."""
    from glmtune.models.quantization import has_quantized_modules, register_quantized_lora

    return register_quantized_lora(config) if has_quantized_modules(model) else config
