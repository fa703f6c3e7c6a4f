"""LoRA through peft: low-rank updates on chosen linear layers, the base frozen. QLoRA is the same over a
base that bitsandbytes quantized to 4-bit NF4 (or 8 bits) while loading (glmtune.models.kbit)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from glmtune.config import MUTATING_LORA_INIT, lora_alpha_of, rslora_of
from glmtune.errors import GlmtuneError, one_line
from glmtune.families import family_facts, is_native
from glmtune.files import read_json_object
from glmtune.methods.lora_dropout import share_input_dropout

def target_modules(option: str, family: str) -> list[str] | str | None:
    if option == "auto":
        targets = family_facts(family).lora_targets
        return list(targets) if targets is not None else None  # None: peft picks by model_type
    if option == "all-linear":
        return "all-linear"
    names = [n.strip() for n in option.split(",") if n.strip()]
    if not names:
        raise GlmtuneError("lora_target is empty; use auto, all-linear or comma-separated module names")
    return names


# glmtune's lora_init -> peft's init_lora_weights ("pissa_niter_16": PiSSA by a fast randomized SVD of 16
# subspace iterations, as LLaMA-Factory's default, instead of a full SVD of every weight)
PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa_niter_16", "olora": "olora"}


class LoraMethod:
    name = "lora"

    def parameters(self, options, family: str) -> dict[str, Any]:
        parameters = {"rank": options.lora_rank, "alpha": lora_alpha_of(options), "dropout": options.lora_dropout,
                      "target": options.lora_target}
        # recorded only when used, so adapters of plain LoRA keep the record they always had
        for name, value, plain in (("use_rslora", rslora_of(options), False), ("use_dora", options.use_dora, False),
                                   ("lora_init", options.lora_init, "default")):
            if value != plain:
                parameters[name] = value
        return parameters

    def apply(self, model, options, family: str):
        from peft import LoraConfig, get_peft_model

        from glmtune.models.quantization import has_quantized_modules

        if options.use_dora and has_quantized_modules(model):
            raise GlmtuneError("use_dora is not available over ChatGLM's own int8/int4 layout; quantize with "
                               "quantization_backend bitsandbytes, or train plain LoRA")
        config = LoraConfig(r=options.lora_rank, lora_alpha=lora_alpha_of(options), lora_dropout=options.lora_dropout,
                            target_modules=target_modules(options.lora_target, family), task_type="CAUSAL_LM",
                            use_rslora=rslora_of(options), use_dora=options.use_dora,
                            init_lora_weights=PEFT_INIT[options.lora_init])
        fit_quantized(model, config)
        try:
            adapted = get_peft_model(model, config)
        except ValueError as e:
            raise GlmtuneError(f"cannot apply LoRA ({e}); set lora_target to module names of this model, "
                               "or all-linear") from None
        share_input_dropout(adapted)  # one dropout mask per input, drawn more cheaply (methods/lora_dropout.py)
        if options.lora_init in MUTATING_LORA_INIT:  # the saved adapter must be converted
            _keep_initial_adapter(adapted)
        return adapted

    def save(self, model, directory: Path) -> None:
        initial = getattr(model, INITIAL_ADAPTER, None)
        if initial is not None:  # PiSSA / OLoRA: saved as a LoRA of twice the rank over the original base
            model.save_pretrained(directory, path_initial_model_for_weight_conversion=initial.name)
        else:
            model.save_pretrained(directory)
        (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model card template, not ours

    def load(self, model, directory: Path, info: dict[str, Any]):
        """The base with the adapter merged in, for generation."""
        from peft import PeftModel

        from glmtune.models.loader import load_errors

        try:
            config = fit_quantized(model, read_lora_config(directory))
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


INITIAL_ADAPTER = "glmtune_initial_adapter"


def _keep_initial_adapter(model) -> None:
    """PiSSA and OLoRA start LoRA from part of each weight and leave the rest in the base (in memory). Their
    starting adapter is written to a temporary folder the process removes on exit, so every save can convert
    the trained adapter (peft's path_initial_model_for_weight_conversion) into one for the original base;
    a resumed run rebuilds the same start from the same seed."""
    import tempfile

    folder = tempfile.TemporaryDirectory(prefix="glmtune-lora-init-")
    model.save_pretrained(folder.name)
    setattr(model, INITIAL_ADAPTER, folder)


def read_lora_config(directory):
    """adapter_config.json as peft reads it, for generation by a causal LM (a tutorial's folder may say
    SEQ_2_SEQ_LM for ChatGLM). Old peft's keys (enable_lora, merge_weights) are dropped without peft's
    warning, which would wrongly tell the user to upgrade peft."""
    import warnings

    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments", category=UserWarning)
        config = LoraConfig.from_pretrained(str(directory))
    config.task_type = "CAUSAL_LM"
    return config


def fit_quantized(model, config):
    """Over quantized layers, peft must use the LoRA layer that refuses to merge into int weights."""
    from glmtune.models.quantization import has_quantized_modules, register_quantized_lora

    return register_quantized_lora(config) if has_quantized_modules(model) else config


# ---------------------------------------------------------------- LoRA folders saved by plain peft

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# peft's keys: base_model.model.<module path in the base>.lora_A.weight (lora_embedding_A for embeddings);
# without that prefix peft would load none of them, silently
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B)(?:\.weight)?$")


def peft_folder_info(directory: Path) -> dict[str, Any]:
    """Adapter info for a LoRA folder written by plain peft (tutorials, LLaMA-Factory, `save_pretrained`):
    the method parameters from adapter_config.json; `base_model` is the folder its base_model_name_or_path
    names when that is a local checkpoint folder, else None (a hub id is only a hint). The family and the
    base fingerprint are the caller's to fill in, from the base it chooses."""
    path = Path(directory) / PEFT_CONFIG
    config = read_json_object(path, "peft adapter config")
    kind = config.get("peft_type")
    if kind != "LORA":
        hint = ("glmtune's P-Tuning v2 reads official ChatGLM checkpoints and glmtune adapters, not peft's "
                "prefix or prompt adapters" if kind in ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING") else
                "glmtune loads peft LoRA folders only")
        raise GlmtuneError(f"{directory} is a peft {kind or 'adapter without a peft_type'} folder; {hint}")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise GlmtuneError(f"{path}: r must be a positive whole number, got {rank!r}; the adapter folder is damaged")
    if config.get("enable_lora"):  # peft 0.2's MergedLinear: its lora_B is a grouped convolution
        raise GlmtuneError(f"{path}: enable_lora {config['enable_lora']!r} is old peft's merged-layer LoRA, which "
                           "current peft no longer loads; retrain it, or convert it to a plain LoRA")
    adapter_weights(Path(directory))  # no weights, or none of them LoRA's: refused before any model loads
    hint = config.get("base_model_name_or_path")
    base = None
    if isinstance(hint, str) and hint and (Path(hint).expanduser() / "config.json").is_file():
        base = os.path.abspath(os.path.expanduser(hint))
    targets = config.get("target_modules")
    target = ",".join(sorted(targets)) if isinstance(targets, list) else targets if isinstance(targets, str) else "auto"
    return {"method": "lora", "family": None, "base_model": base, "base_hint": hint if isinstance(hint, str) else None,
            "template": "auto", "source": "peft",
            "parameters": {"rank": rank, "alpha": config.get("lora_alpha", 8),
                           "dropout": config.get("lora_dropout", 0.0), "target": target},
            "rank_pattern": bool(config.get("rank_pattern"))}


def adapter_weights(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every LoRA tensor name in a peft folder's weights file and its shape (a safetensors header, or the
    small .bin read whole)."""
    source = next((directory / n for n in PEFT_WEIGHTS if (directory / n).is_file()), None)
    if source is None:
        raise GlmtuneError(f"{directory} has {PEFT_CONFIG} but no adapter_model.safetensors or adapter_model.bin")
    from glmtune.models.loader import load_errors

    try:
        if source.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(source), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            import torch

            shapes = {k: tuple(v.shape) for k, v in torch.load(source, map_location="cpu", weights_only=True).items()}
    except (*load_errors(), AttributeError) as e:  # damaged, cut short, or not a tensor mapping
        raise GlmtuneError(f"cannot read {source}: {one_line(e)}") from None
    if not any(_LORA_KEY.match(k) for k in shapes):
        raise GlmtuneError(f"{source} holds no LoRA weights under peft's names (base_model.model.*.lora_A.weight); "
                           "it is not a peft LoRA adapter")
    return shapes


def check_lora_fits(info: dict[str, Any], directory: Path, model, model_name: str) -> None:
    """Refuse a base the LoRA weights in `directory` do not fit: a layer the adapter adapts that the base
    lacks (another family, fewer layers), or other sizes (another model size). `model` may be a skeleton
    on the meta device: only module names and sizes are read."""
    shapes = adapter_weights(Path(directory))
    modules = dict(model.named_modules())
    missing: list[str] = []
    for key, shape in sorted(shapes.items()):
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        name, part = match["module"], match["part"]
        module = modules.get(name)
        if module is None:
            if name not in missing:
                missing.append(name)
            continue
        if len(shape) != 2:
            raise GlmtuneError(f"{directory}: {key} has shape {list(shape)}, not a matrix; the adapter folder "
                               "is damaged")
        rows, cols = shape
        rank = rows if part in ("lora_A", "lora_embedding_A") else cols
        if not info.get("rank_pattern") and rank != info["parameters"]["rank"]:
            raise GlmtuneError(f"{directory}: adapter_config.json says r {info['parameters']['rank']}, but {key} "
                               f"has rank {rank}; the adapter folder is damaged (config and weights differ)")
        size_in, size_out = _sizes(module)
        if size_in is None:
            continue
        found = cols if part in ("lora_A", "lora_embedding_A") else rows
        wanted = size_in if part in ("lora_A", "lora_embedding_A") else size_out
        if found != wanted:
            side = "inputs" if part in ("lora_A", "lora_embedding_A") else "outputs"
            raise GlmtuneError(f"the LoRA adapter in {directory} does not fit {model_name}: its update of {name} "
                               f"has {found} {side}, the model's layer {wanted}; it was trained on a model of "
                               "another size")
    if missing:
        raise GlmtuneError(f"the LoRA adapter in {directory} does not fit {model_name}: {len(missing)} of the layers "
                           f"it adapts are not in this model (e.g. {missing[0]}); it was trained on another model "
                           "family or size")


def _sizes(module) -> tuple[int | None, int | None]:
    """(inputs, outputs) of a layer as LoRA sees it; (None, None) where glmtune cannot tell."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if hasattr(module, "num_embeddings"):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # GPT-2's [in, out]
        return tuple(module.weight.shape)
    return None, None


def model_skeleton(path: Path, family: str):
    """The base model's modules on the meta device (no memory, no weights read), to check an adapter
    against before minutes of loading; None where it cannot be built (the check then runs after loading)."""
    import torch

    from glmtune.models.loader import native_classes

    try:
        with torch.device("meta"):
            if is_native(family):
                config_class, model_class, _ = native_classes(family)
                return model_class(config_class.from_pretrained(path))
            from transformers import AutoConfig, AutoModelForCausalLM

            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    except Exception:  # noqa: BLE001 - only an early check: the loaded model is checked in any case
        return None
