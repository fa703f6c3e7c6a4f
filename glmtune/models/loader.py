"""One loader for every model: look at config.json, pick the family, return (model, tokenizer, family).

Families (see the status table in README.md): `chatglm` (ChatGLM-6B v1), `chatglm2` / `chatglm3` (ChatGLM2/3-6B),
`glm4` (GLM-4 in Hugging Face format) and `generic` (anything transformers' AutoModelForCausalLM
loads). Nothing is loaded with `trust_remote_code`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.config import DEFAULT_MODEL
from glmtune.errors import GlmtuneError, one_line
from glmtune.families import NATIVE_FAMILIES, family_facts
from glmtune.files import read_json_object
from glmtune.models.kbit import Quantization, import_bitsandbytes, is_bitsandbytes_model, keep_standard_layout

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def load_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged, truncated or foreign weight file raises (rather than a bug in glmtune)."""
    import pickle

    from safetensors import SafetensorError

    return OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError


def _cannot_load(path: Path, error: BaseException) -> GlmtuneError:
    text = str(error)
    if "ignore_mismatched_sizes" in text:  # transformers' wording points at a report glmtune does not show
        text = "the weights' shapes do not match its config.json (a config.json of another model size?)"
    return GlmtuneError(f"cannot load the model from {path}: {one_line(text)}")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    family: str
    path: Path  # the checkpoint folder
    name: str  # what the user called it (alias or path), recorded in adapters
    quantization: Quantization = Quantization()  # how the frozen base is quantized (bits 0: not at all)

    @property
    def quantization_bit(self) -> int:
        return self.quantization.bits

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
    return read_json_object(path / "config.json", "model config")


def detect_family(config: dict[str, Any], name: str = "", folder: Path | None = None) -> str:
    """The model family from config.json (and, for ChatGLM2 vs ChatGLM3, the checkpoint's name and, in a
    `folder` with ChatGLM2/3's vocabulary, what its tokenizer config says: config.json is the same for both)."""
    model_type = config.get("model_type", "")
    if model_type == "chatglm":
        if "inner_hidden_size" in config or "position_encoding_2d" in config:
            return "chatglm"
        if "multi_query_attention" in config or "ffn_hidden_size" in config:
            names = f"{name} {config.get('_name_or_path', '')}".lower()
            if "chatglm3" in names:
                return "chatglm3"
            if folder is not None and (folder / "tokenizer.model").is_file():
                from glmtune.models.chatglm2.tokenization import guess_family

                return guess_family(folder)
            return "chatglm2"
        raise GlmtuneError("config.json says model_type chatglm but has neither the ChatGLM-6B fields "
                           "(inner_hidden_size) nor the ChatGLM2/3 fields (ffn_hidden_size)")
    if model_type in ("glm", "glm4"):
        return "glm4"
    return "generic"


def known_token_ids(tokenizer, tokens) -> set[int]:
    """Ids of those `tokens` that are single tokens of this vocabulary."""
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in tokens if t in vocab}


def stop_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Tokens that end an answer: the tokenizer's eos and stop tokens, and every eos the generation config
    names."""
    ids = set(getattr(tokenizer, "stop_token_ids", None) or ())  # e.g. ChatGLM3's <|user|> and <|observation|>
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
    family = detect_family(read_model_config(path), name, path)
    try:
        if family == "chatglm":
            from glmtune.models.chatglm.tokenization import load_chatglm_tokenizer

            tokenizer = load_chatglm_tokenizer(path)
        elif family in NATIVE_FAMILIES:
            from glmtune.models.chatglm2.tokenization import load_chatglm2_tokenizer

            tokenizer = load_chatglm2_tokenizer(path, family)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise GlmtuneError(f"cannot load the tokenizer from {path}: {one_line(e)}") from None
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
               quantization: Quantization | int = 0) -> LoadedModel:
    """Load weights and tokenizer. `device` None leaves the model on the CPU (the Trainer places it), except
    a bitsandbytes base, which is quantized on the device it runs on. `quantization` (or just its bits, 8
    or 4, with the family's default backend) quantizes the base's linear layers; see glmtune.models.kbit."""
    path = resolve_model_path(name)
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):  # before the tokenizer, whose error would say less
        raise GlmtuneError(f"{path} has a config.json but no weight files (*.safetensors or *.bin)")
    _check_safetensors(path)
    tokenizer, family, path = load_tokenizer(name)
    torch_dtype = resolve_dtype(dtype, device or default_device())
    quantization = Quantization.of(quantization).for_family(family)
    extra: dict[str, Any] = {}
    if _stored_with_bitsandbytes(path):  # transformers quantizes it while loading, with bitsandbytes
        import_bitsandbytes()
    if quantization.backend == "bitsandbytes":
        from glmtune.models.kbit import bitsandbytes_config, check_bitsandbytes

        target = device or default_device()
        check_bitsandbytes(target.split(":")[0], family)
        extra = {"quantization_config": bitsandbytes_config(quantization, torch_dtype), "device_map": {"": target}}
    if family in NATIVE_FAMILIES:
        model, quantization = _load_native(path, family, torch_dtype, quantization, extra)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model, loading = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, output_loading_info=True,
                                                                  **extra)
        except load_errors() as e:
            raise _cannot_load(path, e) from None
        missing = sorted(loading.get("missing_keys") or ())
        if missing:  # transformers would fill them with random values and only warn
            names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise GlmtuneError(f"{path} is incomplete: no weight file holds {len(missing)} of the weights its "
                               f"config.json needs ({names}); a shard is missing or was cut short")
    if is_bitsandbytes_model(model):
        keep_standard_layout(model)  # the same weights and arithmetic on every CPU (see glmtune.models.kbit)
    if device and not extra:
        model.to(device)
    return _ready(model, tokenizer, family, path, name, quantization)


def _ready(model, tokenizer, family: str, path: Path, name: str, quantization: Quantization) -> LoadedModel:
    """The generation settings every loaded model gets, and the LoadedModel around it."""
    stops = family_facts(family).stop_tokens
    if stops:  # a turn ends at eos or where the next role would start (ChatGLM3's official chat(), GLM-4's config)
        model.generation_config.eos_token_id = sorted(stop_token_ids(tokenizer, model.generation_config)
                                                      | known_token_ids(tokenizer, stops))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # adapters record the base by this name: a folder by its absolute path, so they work from any directory
    recorded = name if name == DEFAULT_MODEL else os.path.abspath(os.path.expanduser(name))
    return LoadedModel(model, tokenizer, family, path, recorded, quantization)


def load_random_model(name: str, *, dtype: str = "auto", device: str | None = None,
                      quantization: Quantization | int = 0, seed: int = 0) -> LoadedModel:
    """The architecture of `name`'s config.json with random weights, built directly on `device` (the
    default device if None), with its real tokenizer: for measuring speed and memory (tools/gpu_check.py),
    which do not depend on the weights' values. No weight file is read or needed. ChatGLM's own int4/int8
    quantization is applied as load_model applies it; a bitsandbytes base is refused (it quantizes while
    reading weights: save the random model and load_model that)."""
    import torch

    tokenizer, family, path = load_tokenizer(name)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    quantization = Quantization.of(quantization).for_family(family)
    if quantization.backend == "bitsandbytes":
        raise GlmtuneError("random weights cannot be quantized by bitsandbytes here: save the model with "
                           "save_pretrained and load it with quantization")
    torch.manual_seed(seed)
    if family in NATIVE_FAMILIES:
        from glmtune.models.quantization import CHATGLM_QUANTIZED_NAMES, quantize_modules

        config_class, model_class, quantized_part = native_classes(family)
        config = config_class.from_pretrained(path)
        if family == "chatglm2":
            config.rope_interpolates_positions = True  # as _load_native reads it
        if config.quantization_bit:
            raise GlmtuneError(f"{path}: a config of a stored-quantized checkpoint; give the full-precision "
                               "config and quantization_bit instead")
        with torch.device(device):
            model = model_class._from_config(config, dtype=torch_dtype)
        if quantization.backend == "chatglm":
            quantize_modules(quantized_part(model), quantization.bits, CHATGLM_QUANTIZED_NAMES)
            model.config.quantization_bit = quantization.bits
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch_dtype)
    model.eval()  # as from_pretrained leaves it; the Trainer switches to training mode itself
    for param_name, param in model.named_parameters():  # memory left uninitialised would poison every figure
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise GlmtuneError(f"random initialisation left non-finite values in {param_name}")
    return _ready(model, tokenizer, family, path, name, quantization)


def _stored_with_bitsandbytes(path: Path) -> bool:
    """Whether config.json says the checkpoint is stored quantized by bitsandbytes."""
    stored = read_model_config(path).get("quantization_config")
    return isinstance(stored, dict) and stored.get("quant_method") == "bitsandbytes"


def _check_safetensors(path: Path) -> None:
    """Read the header of every safetensors file of the checkpoint (a few KB each): a file cut short or not
    safetensors at all is named before anything loads."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise GlmtuneError(f"cannot read {file}: {one_line(e)} (the file is damaged or was cut short)") from None


def native_classes(family: str):
    """(config class, model class, the module whose linear layers quantization replaces) of a family."""
    if family == "chatglm":
        from glmtune.models.chatglm.configuration import ChatGLMConfig
        from glmtune.models.chatglm.modeling import ChatGLMForConditionalGeneration

        return ChatGLMConfig, ChatGLMForConditionalGeneration, lambda model: model.transformer
    from glmtune.models.chatglm2.configuration import ChatGLM2Config
    from glmtune.models.chatglm2.modeling import ChatGLM2ForConditionalGeneration

    return ChatGLM2Config, ChatGLM2ForConditionalGeneration, lambda model: model.transformer.encoder


def _load_native(path: Path, family: str, torch_dtype, quantization: Quantization, extra: dict[str, Any]):
    """A native ChatGLM family from an official folder (bin shards or safetensors). A checkpoint stored
    quantized (config quantization_bit 4/8) loads as it is; a full one is quantized after loading when
    asked (ChatGLM's layout), or while loading (bitsandbytes, through `extra`)."""
    from glmtune.models.quantization import CHATGLM_QUANTIZED_NAMES, quantize_modules

    config_class, model_class, quantized_part = native_classes(family)
    config = config_class.from_pretrained(path)
    if family == "chatglm2":
        config.rope_interpolates_positions = True  # ChatGLM2's -32k stretches positions; ChatGLM3's the base
    if getattr(config, "quantization_embeddings", False):
        raise GlmtuneError(f"{path} stores quantized embeddings (the -qe checkpoints); glmtune reads the int4/int8 "
                           "checkpoints with full embeddings (e.g. chatglm-6b-int4, chatglm2-6b-int4)")
    stored = config.quantization_bit or 0
    if stored and quantization.backend == "bitsandbytes":
        raise GlmtuneError(f"{path} is stored quantized in ChatGLM's own {stored}-bit layout; bitsandbytes cannot "
                           "re-quantize it (use the full-precision checkpoint for method qlora, or method lora "
                           "on this one)")
    if stored and quantization.bits and quantization.bits != stored:
        raise GlmtuneError(f"{path} is stored quantized to {stored} bits; it cannot be loaded with "
                           f"quantization_bit {quantization.bits} (use {stored} or leave it out)")
    try:
        model = model_class.from_pretrained(path, config=config, dtype=torch_dtype, **extra)
    except load_errors() as e:
        raise _cannot_load(path, e) from None
    if stored:
        return model, Quantization(bits=stored, backend="chatglm")
    if quantization.backend == "chatglm":
        quantize_modules(quantized_part(model), quantization.bits, CHATGLM_QUANTIZED_NAMES)
        model.config.quantization_bit = quantization.bits
    return model, quantization


def context_length(config) -> int | None:
    """The longest sequence (prompt + answer) the model was built for, from its config (or config.json's
    mapping)."""
    if isinstance(config, dict):
        get = (config.get("text_config") or config).get
    else:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        get = lambda key: getattr(config, key, None)  # noqa: E731
    for key in ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions"):
        value = get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fingerprint(config) -> dict[str, Any]:
    """The config values an adapter depends on; an adapter only fits a base with the same ones."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_layers", "vocab_size", "padded_vocab_size")
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: data[k] for k in keys if data.get(k) is not None}
