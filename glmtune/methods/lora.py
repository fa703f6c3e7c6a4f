"""LoRA through peft: low-rank updates on chosen linear layers, the base frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError

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
        from peft import PeftModel

        try:
            adapted = PeftModel.from_pretrained(model, directory, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise GlmtuneError(f"cannot load the LoRA adapter in {directory}: {e}") from None
        return self.for_inference(adapted)

    def for_inference(self, model):
        """Fold the low-rank updates into the base weights: same outputs, and generation no longer pays
        for two extra small matmuls in every adapted layer at every step."""
        return model.merge_and_unload()
