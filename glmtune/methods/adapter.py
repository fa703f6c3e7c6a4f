"""Self-describing adapter folders: the weights plus `glmtune_adapter.json`.

The JSON names the base model, its family and fingerprint, the method and every method parameter, and
the prompt template, so later commands need only `--adapter DIR` and refuse a base the adapter does not
fit. A LoRA folder written by plain peft (no JSON of ours) loads too, over a base named with --model; it
is checked against that base's layer names and sizes instead. glmtune's own LoRA folders are ordinary
peft folders, which plain peft loads as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from glmtune import __version__
from glmtune.errors import GlmtuneError
from glmtune.files import read_json_object

ADAPTER_FILE = "glmtune_adapter.json"
EXPORT_FILE = "glmtune_export.json"  # written by `glmtune export` into the folder it makes
FORMAT_VERSION = 1


def write_adapter_info(directory: str | Path, *, method: str, family: str, base_model: str,
                       fingerprint: dict[str, Any], template: str, parameters: dict[str, Any],
                       extra: dict[str, Any] | None = None) -> Path:
    info = {
        "format": FORMAT_VERSION,
        "glmtune_version": __version__,
        "method": method,
        "family": family,
        "base_model": base_model,
        "base_fingerprint": fingerprint,
        "template": template,
        "parameters": parameters,
        **(extra or {}),
    }
    path = Path(directory) / ADAPTER_FILE
    path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_adapter_info(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / ADAPTER_FILE
    if not directory.is_dir():
        raise GlmtuneError(f"adapter folder not found: {directory}")
    if not path.is_file():
        raise GlmtuneError(f"{directory} is not a glmtune adapter: {ADAPTER_FILE} is missing "
                           "(point --adapter at OUT/adapter or OUT/best of a glmtune run)")
    info = read_json_object(path, ADAPTER_FILE, "; the adapter folder is damaged")
    for key in ("method", "family", "base_model", "parameters"):
        if key not in info:
            raise GlmtuneError(f"{path} lacks {key!r}; the adapter folder is damaged")
    for key in ("parameters", "base_fingerprint"):
        if not isinstance(info.get(key, {}), dict):
            raise GlmtuneError(f"{path}: {key!r} must be a JSON object; the adapter folder is damaged")
    if info["method"] == "ptuning" and not isinstance(info["parameters"].get("pre_seq_len"), int):
        raise GlmtuneError(f"{path}: parameters lack a whole-number 'pre_seq_len'; the adapter folder is damaged")
    return info


def exported_info(model_dir: str | Path) -> dict[str, Any] | None:
    """What a model folder written by `glmtune export --merge` says about itself, shaped like adapter info
    for callers that read `info["template"]`: the prompt template the merged adapter was trained with, and
    `method` None (no adapter is applied on top). None for any other folder, or an unreadable record."""
    path = Path(model_dir) / EXPORT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    return {"method": None, "template": record.get("template") or "auto", "family": record.get("family"),
            "base_model": record.get("base_model"), "exported": record}


def check_base_fits(info: dict[str, Any], family: str, fingerprint: dict[str, Any], adapter_dir: Path,
                    model_name: str) -> None:
    """Refuse a base model of another family or shape than the adapter was trained on."""
    if info["family"] != family:
        raise GlmtuneError(f"adapter {adapter_dir} was trained on a {info['family']} model "
                           f"({info['base_model']}), but {model_name} is a {family} model")
    expected = info.get("base_fingerprint", {})
    differ = {k: (v, fingerprint.get(k)) for k, v in expected.items() if fingerprint.get(k) != v}
    if differ:
        details = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items())
        raise GlmtuneError(f"adapter {adapter_dir} was trained on {info['base_model']}, which does not match "
                           f"{model_name} ({details})")


def check_base_config(info: dict[str, Any], adapter_dir: Path, model: str) -> None:
    """`check_base_fits` without loading weights: the family and those fingerprint values config.json states."""
    from glmtune.models.loader import fingerprint, load_tokenizer, read_model_config

    _, family, path = load_tokenizer(model)
    stated = fingerprint(read_model_config(path))
    expected = {k: v for k, v in info.get("base_fingerprint", {}).items() if k in stated}
    check_base_fits({**info, "base_fingerprint": expected}, family, stated, adapter_dir, model)


def is_plain_peft(directory: str | Path) -> bool:
    """A folder peft wrote (adapter_config.json) without glmtune's record: tutorials', LLaMA-Factory's."""
    from glmtune.methods.lora import PEFT_CONFIG

    directory = Path(directory)
    return directory.is_dir() and not (directory / ADAPTER_FILE).is_file() and (directory / PEFT_CONFIG).is_file()


def plain_peft_info(directory: str | Path, model_name: str | None) -> dict[str, Any]:
    """Adapter info for a plain peft LoRA folder over `model_name` (else the local folder its
    adapter_config.json names), shaped like a glmtune adapter's: family, base_model and fingerprint are
    the chosen base's. The weights are checked against that base's modules before any weights load."""
    from glmtune.methods.lora import check_lora_fits, model_skeleton, peft_folder_info
    from glmtune.models.loader import fingerprint, load_tokenizer, read_model_config

    directory = Path(directory)
    info = peft_folder_info(directory)
    name = model_name or info["base_model"]
    if not name:
        hint = info["base_hint"]
        named = (f"names base model {hint!r}, which is not a local checkpoint folder here (a hub id is only a hint: "
                 "glmtune never downloads)") if hint else "names no base model"
        raise GlmtuneError(f"{directory} is a plain peft LoRA folder whose adapter_config.json {named}; give the "
                           "base checkpoint folder with --model")
    _, family, path = load_tokenizer(name)
    skeleton = model_skeleton(path, family)
    if skeleton is not None:
        check_lora_fits(info, directory, skeleton, name)
    recorded = os.path.abspath(os.path.expanduser(name)) if Path(name).expanduser().is_dir() else name
    return {**info, "format": FORMAT_VERSION, "family": family, "base_model": recorded,
            "base_fingerprint": fingerprint(read_model_config(path))}


def load_tuned_model(model_name: str | None, adapter_dir: str | Path | None, *, dtype: str = "auto",
                     device: str | None = None, quantization=None, pre_seq_len: int | None = None):
    """Base model plus (optionally) an adapter, ready for generation; returns (LoadedModel, adapter info).

    Without `model_name` the base recorded in the adapter is used (or the default model). A plain peft
    LoRA folder (no glmtune_adapter.json) is accepted over `model_name`, or the local base folder its
    adapter_config.json names. An official
    ChatGLM P-Tuning checkpoint folder (no glmtune_adapter.json) is accepted with a model name and, unless
    its config.json records it, `pre_seq_len`. `quantization` (a Quantization, or just bits; 0 for full
    weights) overrides the base quantization the adapter was trained over. Without an adapter the info is
    None, or, for a folder written by `glmtune export --merge`, `exported_info` (template, method None)."""
    from glmtune.config import DEFAULT_MODEL
    from glmtune.methods import get_method
    from glmtune.methods.ptuning import OFFICIAL_FILES, check_prefix_fits, load_official, official_checkpoint_info
    from glmtune.models.kbit import Quantization
    from glmtune.models.loader import (context_length, default_device, fingerprint, load_model, read_model_config,
                                       resolve_model_path)

    adapter = Path(adapter_dir) if adapter_dir else None
    peft = adapter is not None and is_plain_peft(adapter)
    official = (adapter is not None and not peft and adapter.is_dir() and not (adapter / ADAPTER_FILE).is_file()
                and any((adapter / f).is_file() for f in OFFICIAL_FILES))
    if peft:  # checked against the base's config and modules here, before the weights load
        info = plain_peft_info(adapter, model_name)
    else:
        info = read_adapter_info(adapter) if adapter and not official else None
    if official and not model_name:
        raise GlmtuneError(f"{adapter} is not a glmtune adapter ({ADAPTER_FILE} is missing); to load it as an "
                           "official P-Tuning checkpoint, name its base model with --model")
    name = model_name or (info["base_model"] if info else DEFAULT_MODEL)
    # Everything that can be checked without the weights is checked before they load (minutes, for a 6B model).
    if official:  # a folder of other weights is refused at once
        info = official_checkpoint_info(adapter, pre_seq_len)
        if info is None:
            read_adapter_info(adapter)  # raises the usual "not a glmtune adapter" message
    elif info and not peft:
        get_method(info["method"])  # an unknown method
        if pre_seq_len is not None and info["method"] == "ptuning" and pre_seq_len != info["parameters"]["pre_seq_len"]:
            raise GlmtuneError(f"adapter {adapter} has pre_seq_len {info['parameters']['pre_seq_len']}, but "
                               f"--pre-seq-len {pre_seq_len} was given; leave it out for glmtune adapters")
        check_base_config(info, adapter, name)
    if info and info["method"] == "ptuning":
        base_config = read_model_config(resolve_model_path(name))
        check_prefix_fits(info["parameters"]["pre_seq_len"], context_length(base_config))
    quantization = Quantization.chosen(Quantization.from_record(info), quantization)
    loaded = load_model(name, dtype=dtype, device=device or default_device(), quantization=quantization)
    if official:
        info["family"] = loaded.family
        loaded.model = load_official(loaded.model, info, adapter)
    elif info:
        check_base_fits(info, loaded.family, fingerprint(loaded.model.config), adapter, name)
        if peft:  # again on the real modules, in case the skeleton could not be built
            from glmtune.methods.lora import check_lora_fits

            check_lora_fits(info, adapter, loaded.model, name)
        loaded.model = get_method(info["method"]).load(loaded.model, adapter, info)
    elif adapter is None:  # a merged export remembers its prompt template
        info = exported_info(loaded.path)
    loaded.model.eval()
    return loaded, info


def prompt_template_for(given: str | None, adapter_dir: str | Path | None, model_name: str | None,
                        option: str = "--prompt-template") -> str | None:
    """The prompt_template a command uses, found before any weights load: `given` ("" for none), else the one
    the adapter (or a merged export's record) was trained with, else none."""
    from glmtune.data.prompt_template import check_template

    if given is not None:
        return check_template(given, option) or None
    if adapter_dir and (Path(adapter_dir) / ADAPTER_FILE).is_file():
        recorded = read_adapter_info(adapter_dir).get("prompt_template")
    else:
        recorded = ((exported_info(model_name) or {}).get("exported") or {}).get("prompt_template") \
            if model_name and Path(model_name).is_dir() else None
    return check_template(recorded, f"prompt_template recorded in {adapter_dir or model_name}") \
        if isinstance(recorded, str) and recorded else None
