"""Several LoRA adapters over one base, chosen per batch row, with two matmuls per adapted layer whatever their
number.

peft can mix adapters in a batch (`adapter_names`), but it runs each adapter's rows separately in every layer
and registers a hook on every LoRA layer at every forward. On this project's CPU that made one adapter served
unmerged 24 percent slower than the merged model, and three adapters slower still (docs/benchmarks.md). Here
each adapted linear layer gets one forward hook that holds every adapter's matrices side by side: A stacked to
[sum of ranks, in], B to [out, sum of ranks]. A row's low-rank activations outside its adapter's slice are
multiplied by 0 and inside it by the adapter's scaling, so `x A^T (mask) B^T` adds exactly the row's own
update (peft's `scaling * B(A(x))`), and a base row gets none.

Adapters are the files peft writes (glmtune's own and plain peft folders). What this does not cover is
refused with a clear message: DoRA, LoRA on embeddings, per-module alpha patterns, and fully trained modules
(`modules_to_save`); serve such an adapter alone (`--adapter DIR`), where it is merged into the base.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError

WEIGHT_PREFIX = "base_model.model."  # what peft puts in front of the base's module names in its files


class _AdaptedLayer:
    """One linear layer's adapters: matrices side by side, and per adapter its slice of the ranks."""

    def __init__(self, module):
        self.module = module
        self.a: list[torch.Tensor] = []  # [rank, in] each
        self.b: list[torch.Tensor] = []  # [out, rank] each
        self.owners: list[tuple[int, float]] = []  # (adapter index, scaling) per block
        self.stacked_a = self.stacked_b = self.table = None

    def add(self, adapter: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        self.a.append(a)
        self.b.append(b)
        self.owners.append((adapter, scaling))

    def build(self, adapters: int, device) -> None:
        """The stacked matrices, and `table` [adapters + 1, sum of ranks]: each adapter's scaling over its slice
        (the last row, the base, all zeros)."""
        self.stacked_a = torch.cat(self.a).to(device)
        self.stacked_b = torch.cat(self.b, dim=1).to(device)
        self.table = torch.zeros(adapters + 1, self.stacked_a.shape[0], device=device)
        start = 0
        for (adapter, scaling), a in zip(self.owners, self.a):
            self.table[adapter, start:start + a.shape[0]] = scaling
            start += a.shape[0]

    def hook(self, owner: "MultiLora"):
        def add_updates(module, args, output):
            rows = owner.rows
            if rows is None:
                return output
            x = args[0]
            low = x.to(self.stacked_a.dtype) @ self.stacked_a.T  # [batch, tokens, sum of ranks]
            mask = self.table[rows]  # [batch, sum of ranks]
            update = (low * mask.view(mask.shape[0], *([1] * (low.dim() - 2)), mask.shape[1])) @ self.stacked_b.T
            return output + update.to(output.dtype)

        return add_updates


class MultiLora:
    """The adapters over one model; `rows(names)` around a forward says which adapter each batch row uses."""

    def __init__(self, model):
        self.model = model
        self.names: list[str] = []
        self.layers: dict[str, _AdaptedLayer] = {}
        self.rows: torch.Tensor | None = None
        self.handles = []

    def add(self, name: str, folder: str | Path) -> None:
        """Reads a peft LoRA folder (adapter_config.json and adapter_model.safetensors or .bin) as adapter `name`."""
        folder = Path(folder)
        config = _read_config(folder)
        problem = _unsupported(config)
        if problem:
            raise GlmtuneError(f"adapter {name} ({folder}) uses {problem}, which several adapters over one base do not "
                               "support; serve it alone (--adapter DIR)")
        weights = _read_weights(folder)
        index = len(self.names)
        alpha, rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora"))
        found = 0
        for key, a in weights.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key.removesuffix(".lora_A.weight").removeprefix(WEIGHT_PREFIX)
            b = weights.get(key.replace(".lora_A.", ".lora_B."))
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                module = None
            shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
            if b is None or module is None or shape != (b.shape[0], a.shape[1]) or b.shape[1] != a.shape[0]:
                raise GlmtuneError(f"adapter {name} ({folder}) does not fit this base: {path} is missing or of another "
                                   "size; it was trained on another model")
            rank = a.shape[0]
            scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
            self.layers.setdefault(path, _AdaptedLayer(module)).add(index, a.float(), b.float(), scaling)
            found += 1
        if not found:
            raise GlmtuneError(f"adapter {name} ({folder}) holds no LoRA weights")
        self.names.append(name)

    def install(self) -> None:
        """Builds the stacked matrices and hooks every adapted layer (once, after the last `add`)."""
        device = self.model.get_input_embeddings().weight.device
        for layer in self.layers.values():
            layer.build(len(self.names), device)
            self.handles.append(layer.module.register_forward_hook(layer.hook(self)))

    @contextlib.contextmanager
    def batch(self, names: list[str | None]):
        """For the forward inside: row i uses adapter names[i] (None: the bare base)."""
        base = len(self.names)
        index = [self.names.index(n) if n is not None else base for n in names]
        self.rows = torch.tensor(index, device=self.model.get_input_embeddings().weight.device)
        try:
            yield
        finally:
            self.rows = None


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GlmtuneError(f"cannot read {folder / 'adapter_config.json'}: {e}") from None


def _unsupported(config: dict) -> str | None:
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft method {config.get('peft_type')}"
    if config.get("use_dora"):
        return "DoRA"
    if config.get("modules_to_save"):
        return "fully trained modules (modules_to_save)"
    if config.get("alpha_pattern"):
        return "per-module alpha (alpha_pattern)"
    if config.get("lora_bias"):
        return "LoRA biases (lora_bias)"
    return None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors, pickled = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if safetensors.is_file():
        from safetensors.torch import load_file

        weights = load_file(str(safetensors))
    elif pickled.is_file():
        weights = torch.load(pickled, map_location="cpu", weights_only=True)
    else:
        raise GlmtuneError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")
    if any("lora_embedding" in key for key in weights):
        raise GlmtuneError(f"{folder} adapts an embedding layer, which several adapters over one base do not "
                           "support; serve it alone (--adapter DIR)")
    return weights
