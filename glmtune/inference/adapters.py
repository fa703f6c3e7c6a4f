"""Several adapters served over one copy of a base model.

LoRA adapters stay unmerged, side by side in each adapted layer (glmtune.inference.multi_lora), so each batch
row picks its adapter (glmtune.inference.batching). A P-Tuning v2 adapter is a key/value prefix: it is loaded
onto the base the usual way, its keys and values are computed once, and the prefix encoder is taken off the
base again; a row of that adapter then starts its cache with those keys and values. The base itself is served
too, under its own name.

Every adapter must have been trained over the same base (checked as `glmtune predict --adapter` checks one),
and each keeps its own prompt format and prompt template.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch

from glmtune.errors import GlmtuneError
from glmtune.inference.batching import BASE_ROUTE, Route
from glmtune.inference.multi_lora import MultiLora

BASE_NAME = "base"  # what clients call the bare base model when adapters are served beside it
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclass
class ServedModel:
    """A name clients ask for (None: the one model of a single-model server), how its prompts are built, and
    which adapter its rows run under."""

    name: str | None
    generator: Any  # glmtune.inference.generate.Generator over the shared model
    prompt_template: str | None = None
    route: Route = field(default_factory=lambda: BASE_ROUTE)


def parse_adapter_option(value: str) -> tuple[str | None, str]:
    """`NAME=DIR` -> (NAME, DIR); a bare `DIR` -> (None, DIR). A folder whose own name holds '=' is written
    with a name in front."""
    name, sep, folder = value.partition("=")
    if not sep or not name or "/" in name and Path(value).exists():
        return None, value
    if not NAME_PATTERN.fullmatch(name):
        raise GlmtuneError(f"--adapter {value}: the name {name!r} must be letters, digits and . _ : / - (at most "
                           "128, starting with a letter or digit)")
    if not folder:
        raise GlmtuneError(f"--adapter {value}: give the adapter folder after '='")
    return name, folder


def run_name(folder: str) -> str:
    """What an adapter folder is called: its run's folder for OUT/adapter or OUT/best, else its own name."""
    path = PurePath(os.path.abspath(folder))
    return path.parent.name if path.name in ("adapter", "best") else path.name


def adapter_names(values: list[str]) -> list[tuple[str, str]]:
    """(name, folder) for each --adapter; a bare folder is named after its run (OUT/adapter -> OUT's name)."""
    named, seen = [], set()
    for value in values:
        name, folder = parse_adapter_option(value)
        if name is None:
            name = run_name(folder)
        if name == BASE_NAME:
            raise GlmtuneError(f"--adapter {value}: {BASE_NAME!r} is the bare base model's name; choose another")
        if name in seen:
            raise GlmtuneError(f"--adapter {value}: the name {name!r} is given twice; name each adapter NAME=DIR")
        seen.add(name)
        named.append((name, folder))
    return named


def _info(folder: Path, model_name: str | None) -> dict[str, Any]:
    from glmtune.methods import get_method
    from glmtune.methods.adapter import ADAPTER_FILE, is_plain_peft, plain_peft_info, read_adapter_info

    if not folder.is_dir():
        raise GlmtuneError(f"adapter folder {folder} does not exist")
    if is_plain_peft(folder):
        return plain_peft_info(folder, model_name)
    if not (folder / ADAPTER_FILE).is_file():
        raise GlmtuneError(f"{folder} is not a glmtune adapter ({ADAPTER_FILE} is missing) nor a peft LoRA folder; "
                           "an official P-Tuning checkpoint is served alone (one --adapter DIR with --pre-seq-len)")
    info = read_adapter_info(folder)
    get_method(info["method"])
    return info


def load_served_models(model_name: str | None, adapters: list[tuple[str, str]], *, dtype: str = "auto",
                       quantization=None, template: str | None = None, prompt_template: str | None = None,
                       limits=None) -> list[ServedModel]:
    """The base (named BASE_NAME) and every adapter over it, sharing one loaded copy of the base. `template` and
    `prompt_template` (the command line's; "" for none) override each adapter's own; `quantization`, what the
    first adapter recorded."""
    from glmtune.inference.generate import Generator
    from glmtune.methods.adapter import check_base_config, check_base_fits, is_plain_peft, prompt_template_for
    from glmtune.methods.lora import check_lora_fits
    from glmtune.models.kbit import Quantization
    from glmtune.models.loader import default_device, fingerprint, load_model

    folders = [(name, Path(folder)) for name, folder in adapters]
    infos = {name: _info(folder, model_name) for name, folder in folders}
    bases = {name: info.get("base_model") for name, info in infos.items()}
    base = model_name or next((b for b in bases.values() if b), None)
    if base is None:
        from glmtune.config import DEFAULT_MODEL

        base = DEFAULT_MODEL
    for name, folder in folders:
        check_base_config(infos[name], folder, base)
    first = infos[folders[0][0]] if folders else None
    quantization = Quantization.chosen(Quantization.from_record(first), quantization)
    loaded = load_model(base, dtype=dtype, device=default_device(), quantization=quantization)
    for name, folder in folders:
        check_base_fits(infos[name], loaded.family, fingerprint(loaded.model.config), folder, base)
        if is_plain_peft(folder):  # on the real modules, in case the skeleton could not be built
            check_lora_fits(infos[name], folder, loaded.model, base)
    loaded.model.eval()

    routes: dict[str, Route] = {}
    for name, folder in folders:  # prefixes first, while the base is still a plain model
        if infos[name]["method"] == "ptuning":
            routes[name] = Route(prefix=prefix_key_values(loaded.model, folder, infos[name]))
    lora = [(name, folder) for name, folder in folders if infos[name]["method"] != "ptuning"]
    if lora:
        adapters = MultiLora(loaded.model)
        for name, folder in lora:
            adapters.add(name, folder)
            routes[name] = Route(lora=name, adapters=adapters)
        adapters.install()

    def generator(info: dict | None) -> Generator:
        return Generator(loaded, template or (info or {}).get("template") or "auto", limits)

    served = [ServedModel(BASE_NAME, generator(None), prompt_template_for(prompt_template, None, base))]
    for name, folder in folders:
        info = infos[name]
        served.append(ServedModel(name, generator(info), prompt_template_for(prompt_template, folder, base),
                                  routes[name]))
    return served


@torch.no_grad()
def prefix_key_values(model, folder: Path, info: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A P-Tuning adapter's prefix as per-layer (keys, values) [kv_heads, pre_seq_len, head_dim] in the model's
    dtype: loaded onto `model` as for predict, computed once, and taken off the model again."""
    from glmtune.families import is_native_model
    from glmtune.methods import get_method
    from glmtune.models.prefix_attention import detach_prefix, prefix_shape, split_layers

    get_method("ptuning").load(model, folder, info)
    dtype = model.get_input_embeddings().weight.dtype
    try:
        if is_native_model(model):
            transformer = model.transformer
            transformer.eval()
            pairs = [(k[0], v[0]) for k, v in transformer.prefix_key_values(1, dtype, transformer.prefix_encoder
                                                                             .embedding.weight.device)]
        else:
            encoder = model.prefix_encoder
            positions = torch.arange(encoder.pre_seq_len, device=encoder.embedding.weight.device)
            pairs = split_layers(encoder(positions), prefix_shape(model.config))
    finally:
        if is_native_model(model):
            model.transformer.disable_prefix()
        else:
            detach_prefix(model)
    return [(k.to(dtype).contiguous(), v.to(dtype).contiguous()) for k, v in pairs]
