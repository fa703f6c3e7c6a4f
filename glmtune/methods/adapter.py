"""Self-describing adapter folders: the weights plus `glmtune_adapter.json`.

The JSON names the base model, its family and fingerprint, the method and every method parameter, and
the prompt template, so later commands need only `--adapter DIR` and refuse a base the adapter does not
fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmtune import __version__
from glmtune.errors import GlmtuneError
from glmtune.files import loads

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
    try:
        info = loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # bad JSON, or nested absurdly deep (glmtune.files)
        raise GlmtuneError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(info, dict):
        raise GlmtuneError(f"{path} must hold a JSON object, not {type(info).__name__}; the adapter folder is damaged")
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


def load_tuned_model(model_name: str | None, adapter_dir: str | Path | None, *, dtype: str = "auto",
                     device: str | None = None, quantization=None, pre_seq_len: int | None = None):
    """Base model plus (optionally) an adapter, ready for generation; returns (LoadedModel, adapter info).

    Without `model_name` the base recorded in the adapter is used (or the default model). An official
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
    official = (adapter is not None and adapter.is_dir() and not (adapter / ADAPTER_FILE).is_file()
                and any((adapter / f).is_file() for f in OFFICIAL_FILES))
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
    elif info:
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
        loaded.model = get_method(info["method"]).load(loaded.model, adapter, info)
    elif adapter is None:  # a merged export remembers its prompt template
        info = exported_info(loaded.path)
    loaded.model.eval()
    return loaded, info
