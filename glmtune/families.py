"""What each model family is, in one table: models, methods, data and train ask it instead of naming families.

A family is what glmtune.models.loader.detect_family reads from a checkpoint's config.json. A name this table
does not know (an adapter recorded by a newer glmtune, say) is treated as `generic`: transformers' own classes
with no family-specific layout, as every other causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass

GLM4_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # a GLM-4 turn ends where the next would start
CHATGLM3_STOP_TOKENS = ("<|user|>", "<|observation|>")  # the official chat() also stops at these

# How packed samples (glmtune.data.packing) are kept apart:
PACK_CHATGLM = "chatglm"  # ChatGLM-6B's own 2D positions and block mask per sample (models.chatglm.modeling)
PACK_POSITIONS = "positions"  # restarting position ids, which the model itself turns into per-sample masks
PACK_TRANSFORMERS = "transformers"  # restarting position ids through transformers' shared mask code


@dataclass(frozen=True)
class Family:
    name: str
    native: bool  # glmtune's own model and tokenizer code (glmtune.models.chatglm / chatglm2), official names
    lora_targets: tuple[str, ...] | None  # LoRA's default target modules; None: peft's per-architecture defaults
    template: str | None  # its own prompt layout, the only one it accepts (glmtune.data.templates)
    # the layout `auto` picks while `chat` stays allowed (GLM-4: its official layout, tools included, which its
    # chat template writes too but without the trained end of each answer)
    fallback_template: str | None
    stop_tokens: tuple[str, ...]  # tokens that end an answer besides eos (those in the vocabulary)
    quantization_backend: str  # what quantization_backend auto means for it (glmtune.models.kbit)
    packing: str  # PACK_*: how packed samples keep apart


_CHATGLM_TARGETS = ("query_key_value",)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("chatglm", True, _CHATGLM_TARGETS, "chatglm", None, (), "chatglm", PACK_CHATGLM),
    Family("chatglm2", True, _CHATGLM_TARGETS, "chatglm2", None, (), "chatglm", PACK_POSITIONS),
    Family("chatglm3", True, _CHATGLM_TARGETS, "chatglm3", None, CHATGLM3_STOP_TOKENS, "chatglm", PACK_POSITIONS),
    Family("glm4", False, ("q_proj", "k_proj", "v_proj", "o_proj"), None, "glm4", GLM4_STOP_TOKENS, "bitsandbytes",
           PACK_TRANSFORMERS),
    Family("generic", False, None, None, None, (), "bitsandbytes", PACK_TRANSFORMERS),
)}

# every name `template:` accepts: auto, the tokenizer's chat template, plain text, and each family's own layout
TEMPLATE_NAMES = ("auto", "chat", "plain") + tuple(dict.fromkeys(
    name for f in FAMILIES.values() for name in (f.template, f.fallback_template) if name))
NATIVE_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.native)  # ("chatglm", "chatglm2", "chatglm3")
# config.json's model_type of every native family; detect_family refuses a chatglm config it cannot place, so a
# loaded model with this type is native
NATIVE_MODEL_TYPE = "chatglm"


def family_facts(name: str) -> Family:
    """The table's row for `name`; an unknown name gets the generic row."""
    return FAMILIES.get(name) or FAMILIES["generic"]


def is_native(name: str) -> bool:
    return family_facts(name).native


def is_native_model(model) -> bool:
    """Whether a loaded model is one of glmtune's own ChatGLM classes (read from its config, not its attributes)."""
    return getattr(getattr(model, "config", None), "model_type", None) == NATIVE_MODEL_TYPE
