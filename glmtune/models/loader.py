"""One loader for every model: look at config.json, pick the family, return (model, tokenizer, family).

Families (see the status table in README.md): `chatglm` (ChatGLM-6B v1), `chatglm2` / `chatglm3` (ChatGLM2/3-6B),
`glm4` (GLM-4 in Hugging Face format) and `generic` (anything transformers' AutoModelForCausalLM
loads). Nothing is loaded with `trust_remote_code`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.config import DEFAULT_MODEL
from glmtune.errors import GlmtuneError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    family: str
    path: Path  # the checkpoint folder
    name: str  # what the user called it (alias or path), recorded in adapters
    quantization_bit: int = 0  # weight-only quantization of the base (0: none)

    @property
    def stop_ids(self) -> set[int]:
        return stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))


def resolve_model_path(name: str) -> Path:
    """A checkpoint folder for `name`: the default model's alias, or a local folder with config.json."""
    if name == DEFAULT_MODEL:
        from glmtune.models.default_model import default_model_path

        return default_model_path()
    path = Path(name).expanduser()
    if not path.exists():
        raise GlmtuneError(f"model not found: {name!r} is neither a local checkpoint folder nor the alias "
                           f"{DEFAULT_MODEL!r} (glmtune never downloads weights; download them first)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise GlmtuneError(f"{path} is not a checkpoint folder: it needs a config.json beside the weights")
    return path


def read_model_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GlmtuneError(f"{path / 'config.json'} is not valid JSON: {e}") from None


def detect_family(config: dict[str, Any], name: str = "") -> str:
    """The model family from config.json (and, for ChatGLM2 vs ChatGLM3, the checkpoint's name)."""
    model_type = config.get("model_type", "")
    if model_type == "chatglm":
        if "inner_hidden_size" in config or "position_encoding_2d" in config:
            return "chatglm"
        if "multi_query_attention" in config or "ffn_hidden_size" in config:
            names = f"{name} {config.get('_name_or_path', '')}".lower()
            return "chatglm3" if "chatglm3" in names else "chatglm2"
        raise GlmtuneError("config.json says model_type chatglm but has neither the ChatGLM-6B fields "
                           "(inner_hidden_size) nor the ChatGLM2/3 fields (ffn_hidden_size)")
    if model_type in ("glm", "glm4"):
        return "glm4"
    return "generic"


NATIVE_FAMILIES = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2-6B", "chatglm3": "ChatGLM3-6B"}
IMPLEMENTED_NATIVE = ("chatglm",)


def _require_supported(family: str, path: Path) -> None:
    if family in NATIVE_FAMILIES and family not in IMPLEMENTED_NATIVE:
        raise GlmtuneError(f"{path} is a {NATIVE_FAMILIES[family]} checkpoint; glmtune's native "
                           f"{NATIVE_FAMILIES[family]} implementation is not part of this version yet, and its "
                           "remote code is never run. Use a transformers-native model for now.")


def stop_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Tokens that end an answer: the tokenizer's eos and every eos the generation config names."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    return ids


def load_tokenizer(name: str) -> tuple[Any, str, Path]:
    """(tokenizer, family, checkpoint folder), without loading any weights."""
    path = resolve_model_path(name)
    family = detect_family(read_model_config(path), name)
    _require_supported(family, path)
    try:
        if family == "chatglm":
            from glmtune.models.chatglm.tokenization import load_chatglm_tokenizer

            tokenizer = load_chatglm_tokenizer(path)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise GlmtuneError(f"cannot load the tokenizer from {path}: {e}") from None
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any token serves; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, family, path


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str | None = None,
               quantization_bit: int = 0) -> LoadedModel:
    """Load weights and tokenizer. `device` None leaves the model on the CPU (the Trainer places it).
    `quantization_bit` 8 or 4 quantizes the base's linear layers (native ChatGLM families)."""
    tokenizer, family, path = load_tokenizer(name)
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise GlmtuneError(f"{path} has a config.json but no weight files (*.safetensors or *.bin)")
    torch_dtype = resolve_dtype(dtype, device or default_device())
    if family == "chatglm":
        model, quantization_bit = _load_chatglm(path, torch_dtype, quantization_bit)
    else:
        if quantization_bit:
            raise GlmtuneError(f"quantization_bit is for the native ChatGLM families; {name} is a {family} model "
                               "(load it in full precision, quantization_bit: 0)")
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise GlmtuneError(f"cannot load the model from {path}: {e}") from None
    if device:
        model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, family, path, name, quantization_bit)


def _load_chatglm(path: Path, torch_dtype, quantization_bit: int):
    """ChatGLM-6B from an official folder (bin shards or safetensors). A checkpoint stored quantized
    (config quantization_bit 4/8) loads as it is; a full one is quantized after loading when asked."""
    from glmtune.models.chatglm.configuration import ChatGLMConfig
    from glmtune.models.chatglm.modeling import ChatGLMForConditionalGeneration
    from glmtune.models.quantization import CHATGLM_QUANTIZED_NAMES, quantize_modules

    config = ChatGLMConfig.from_pretrained(path)
    if getattr(config, "quantization_embeddings", False):
        raise GlmtuneError(f"{path} stores quantized embeddings (the -qe checkpoints); glmtune reads the int4/int8 "
                           "checkpoints with full embeddings (chatglm-6b-int4, chatglm-6b-int8)")
    stored = config.quantization_bit or 0
    if stored and quantization_bit and quantization_bit != stored:
        raise GlmtuneError(f"{path} is stored quantized to {stored} bits; it cannot be loaded with "
                           f"quantization_bit {quantization_bit} (use {stored} or leave it out)")
    try:
        model = ChatGLMForConditionalGeneration.from_pretrained(path, config=config, dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise GlmtuneError(f"cannot load the model from {path}: {e}") from None
    if quantization_bit and not stored:
        quantize_modules(model.transformer, quantization_bit, CHATGLM_QUANTIZED_NAMES)
        model.config.quantization_bit = quantization_bit
    return model, stored or quantization_bit


def fingerprint(config) -> dict[str, Any]:
    """The config values an adapter depends on; an adapter only fits a base with the same ones."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_layers", "vocab_size", "padded_vocab_size")
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: data[k] for k in keys if data.get(k) is not None}
