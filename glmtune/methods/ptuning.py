"""P-Tuning v2: a trained key/value prefix in front of every layer; the base model stays frozen.

The native ChatGLM models carry the prefix encoder themselves (`model.transformer.prefix_encoder`, as in
the official code), so official P-Tuning checkpoints (a `pytorch_model.bin` holding
`transformer.prefix_encoder.*`) load too. Every other family (GLM-4, any transformers causal LM) gets
the encoder at `model.prefix_encoder`, fed into attention by `glmtune.models.prefix_attention`. Either
way an adapter is the prefix weights plus the parameters that shaped them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from glmtune.errors import GlmtuneError, one_line
from glmtune.families import is_native, is_native_model

WEIGHTS_FILE = "prefix_encoder.safetensors"
OFFICIAL_FILES = ("pytorch_model.bin", "model.safetensors")
KEY_PREFIX = "transformer.prefix_encoder."  # the official names, used by the native families
GENERIC_KEY_PREFIX = "prefix_encoder."  # every other family


def key_prefix(model) -> str:
    """Where the prefix encoder's weights are named in the model's state dict (and in adapter files)."""
    return KEY_PREFIX if is_native_model(model) else GENERIC_KEY_PREFIX


def prefix_encoder(model):
    """The model's prefix encoder (after P-Tuning was applied or loaded)."""
    return model.transformer.prefix_encoder if is_native_model(model) else model.prefix_encoder


def check_prefix_fits(pre_seq_len: int, limit: int | None) -> None:
    """A prefix as long as the model's context (`limit` tokens, None: unknown) leaves no room for text."""
    if limit and pre_seq_len >= limit:
        raise GlmtuneError(f"pre_seq_len {pre_seq_len} leaves no room for text: the model's context is {limit} "
                           "tokens; use a prefix of a few hundred tokens at most")


def _enable(model, parameters: dict[str, Any], *, fresh: bool = True) -> None:
    """Give the model its prefix encoder; `fresh` False when trained weights are loaded into it next."""
    from glmtune.models.loader import context_length

    pre_seq_len = parameters["pre_seq_len"]
    check_prefix_fits(pre_seq_len, context_length(model.config))
    if is_native_model(model):
        model.transformer.enable_prefix(pre_seq_len, projection=parameters["prefix_projection"],
                                        hidden_size=parameters.get("prefix_hidden_size"))
    else:
        from glmtune.models.prefix_attention import attach_prefix

        attach_prefix(model, pre_seq_len, projection=parameters["prefix_projection"],
                      hidden_size=parameters.get("prefix_hidden_size"), start_from_model=fresh)


def prefix_state(model) -> dict[str, torch.Tensor]:
    names = key_prefix(model)
    return {names + k: v.detach().float().contiguous().cpu() for k, v in prefix_encoder(model).state_dict().items()}


def _load_prefix(model, state: dict[str, torch.Tensor], directory: Path, parameters: dict[str, Any], *,
                 official: bool = False) -> None:
    names = key_prefix(model)
    state = {k.removeprefix(names): v for k, v in state.items() if k.startswith(names)}
    if not state:
        raise GlmtuneError(f"{directory} holds no prefix encoder weights ({names}*)")
    encoder = prefix_encoder(model)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found.keys() != expected.keys():
        kind = "with" if "trans.0.weight" in found else "without"
        raise GlmtuneError(f"the prefix in {directory} was trained {kind} prefix_projection, but "
                           f"prefix_projection is {parameters['prefix_projection']}; set it to match")
    rows = found["embedding.weight"][0]
    if rows != parameters["pre_seq_len"]:
        if not official:  # a glmtune adapter records its own length: the two disagree only in a damaged folder
            raise GlmtuneError(f"the prefix in {directory} has pre_seq_len {rows}, but its glmtune_adapter.json says "
                               f"{parameters['pre_seq_len']}; the adapter folder is damaged")
        raise GlmtuneError(f"the prefix in {directory} has pre_seq_len {rows}, but pre_seq_len "
                           f"{parameters['pre_seq_len']} was asked for; use --pre-seq-len {rows}")
    wrong = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    if wrong:
        details = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in wrong.items())
        raise GlmtuneError(f"the prefix in {directory} does not fit this base model ({details}); it was "
                           "trained on a model of another size")
    encoder.load_state_dict({k: v.to(encoder.embedding.weight.dtype) for k, v in state.items()})


class PTuningMethod:
    name = "ptuning"

    def parameters(self, options, family: str) -> dict[str, Any]:
        return {"pre_seq_len": options.pre_seq_len, "prefix_projection": options.prefix_projection,
                "prefix_hidden_size": options.prefix_hidden_size}

    def apply(self, model, options, family: str):
        parameters = self.parameters(options, family)
        _enable(model, parameters)
        names = key_prefix(model)
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(names)
        return model

    def save(self, model, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(prefix_state(model), str(Path(directory) / WEIGHTS_FILE), metadata={"format": "pt"})

    def load(self, model, directory: Path, info: dict[str, Any]):
        from safetensors.torch import load_file

        parameters = info["parameters"]
        _enable(model, parameters, fresh=False)
        path = Path(directory) / WEIGHTS_FILE
        if not path.is_file():
            raise GlmtuneError(f"{directory} lacks {WEIGHTS_FILE}; the adapter folder is damaged")
        _load_prefix(model, load_file(path), Path(directory), parameters)
        return self.for_inference(model)

    def for_inference(self, model):
        return model  # the prefix is already part of every forward


def official_checkpoint_info(directory: Path, pre_seq_len: int | None) -> dict[str, Any] | None:
    """Adapter info for an official P-Tuning checkpoint folder, or None when it is not one.

    Such a folder has `pytorch_model.bin` (or model.safetensors) with the prefix weights and, when the
    Trainer wrote it, a config.json with pre_seq_len and prefix_projection; --pre-seq-len wins over it
    and must match the weights. The family is the caller's to fill in, from the base model."""
    weights = next((directory / f for f in OFFICIAL_FILES if (directory / f).is_file()), None)
    if weights is None:
        return None
    state = read_weights(weights)
    if not any(k.startswith(KEY_PREFIX) for k in state):
        return None
    config: dict[str, Any] = {}
    if (directory / "config.json").is_file():
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
        config = config if isinstance(config, dict) else {}
    rows = int(state[KEY_PREFIX + "embedding.weight"].shape[0]) if KEY_PREFIX + "embedding.weight" in state else None
    recorded = config.get("pre_seq_len")
    if pre_seq_len is None and recorded is None:
        raise GlmtuneError(f"{directory} is an official P-Tuning checkpoint; give its prefix length with "
                           f"--pre-seq-len (its weights have {rows} rows)")
    wanted = pre_seq_len if pre_seq_len is not None else recorded
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise GlmtuneError(f"{directory / 'config.json'}: pre_seq_len must be a positive whole number, got {wanted!r}; "
                           f"give it with --pre-seq-len (its weights have {rows} rows)")
    if rows is not None and int(wanted) != rows:  # refused here, before the base model loads
        given = f"--pre-seq-len {pre_seq_len} was given" if pre_seq_len is not None else \
            f"its config.json says pre_seq_len {recorded}"
        raise GlmtuneError(f"the prefix in {directory} has pre_seq_len {rows}, but {given}; use --pre-seq-len {rows}")
    return {
        "method": "ptuning",
        "base_model": None,
        "template": "auto",
        "parameters": {"pre_seq_len": int(wanted),
                       "prefix_projection": KEY_PREFIX + "trans.0.weight" in state,
                       "prefix_hidden_size": None},
        "official_weights": str(weights),
    }


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: say which and why
        raise GlmtuneError(f"cannot read {path}: {one_line(e)}") from None


def load_official(model, info: dict[str, Any], directory: Path):
    if not is_native(info["family"]):  # only the native families have the official prefix encoder
        raise GlmtuneError(f"{directory} is an official ChatGLM P-Tuning checkpoint, but the base model is a "
                           f"{info['family']} model; it loads over ChatGLM-6B, ChatGLM2-6B or ChatGLM3-6B")
    parameters = info["parameters"]
    _enable(model, parameters, fresh=False)
    _load_prefix(model, read_weights(Path(info["official_weights"])), directory, parameters, official=True)
    return model
