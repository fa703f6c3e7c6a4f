"""Folding a LoRA adapter into its base and saving the result as an ordinary checkpoint.

The merge is done here rather than by peft's merge_and_unload so that one path serves every base: over a
quantized base (ChatGLM's int layout or bitsandbytes) the int layers are first replaced by float layers
holding exactly the weights the adapter was trained against, and only then is the update added; peft's
bitsandbytes merge would instead re-quantize the sum and lose most of the update.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError, one_line
from glmtune.models.loader import read_model_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
SHARD_BYTES = 5 * 2**30  # the usual Hugging Face shard size


def dequantize_base(model) -> bool:
    """Replace the quantized layers of a (peft-wrapped) model by float32 ones, in place; whether any were."""
    from glmtune.models.kbit import is_bitsandbytes_model
    from glmtune.models.quantization import dequantize_modules, has_quantized_modules

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if has_quantized_modules(model):
        dequantize_modules(model, torch.float32)
        return True
    if is_bitsandbytes_model(inner):
        from glmtune.models.kbit import dequantize_bitsandbytes

        dequantize_bitsandbytes(model, torch.float32)
        return True
    return False


@torch.no_grad()
def fold_lora(peft_model):
    """Add every active LoRA update to its (float) base weight and return the plain model without peft's
    wrappers. The base layers must be float by now (see dequantize_base)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        for name in module.active_adapters:
            if name not in module.lora_A and name not in module.lora_embedding_A:
                continue
            if name in module.lora_variant or module.lora_bias.get(name):
                raise GlmtuneError("this adapter uses a LoRA variant (DoRA or a LoRA bias), which glmtune "
                                   "does not merge; export it without --merge")
            if not base.weight.is_floating_point():
                raise RuntimeError(f"{type(base).__name__} still holds int weights; dequantize before merging")
            base.weight += module.get_delta_weight(name).to(base.weight.dtype)
    return peft_model.unload()  # peft swaps each wrapper for its (now updated) base layer


def base_weight_sources(path: Path) -> dict[str, Path]:
    """Every weight name of a checkpoint folder and the file holding it, read the way transformers picks
    files: safetensors (sharded or not) before PyTorch .bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index_name).is_file():
            weight_map = json.loads((path / index_name).read_text(encoding="utf-8"))["weight_map"]
            return {key: path / file for key, file in weight_map.items()}
        if (path / single).is_file():
            return dict.fromkeys(_file_keys(path / single), path / single)
    raise GlmtuneError(f"{path} has no model.safetensors or pytorch_model.bin (nor a sharded index) to take the "
                       "weight names from")


def _file_keys(file: Path) -> list[str]:
    return list(_read_file(file)) if file.suffix == ".bin" else _safetensors_keys(file)


def _safetensors_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, memory-mapped where the format allows."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu().contiguous()


def save_native(model, base_path: Path, out: Path, dtype: torch.dtype) -> list[str]:
    """The merged weights of a native ChatGLM model under the base checkpoint's own names, as safetensors.

    Exactly the base's key set: names the model has come from the model (cast to dtype), names it lacks
    (e.g. the official rotary inv_freq buffers) are copied from the base files as they are, and names the base
    does not store (a tied lm_head) are left out. A base stored quantized loses only its `weight_scale`s."""
    sources = base_weight_sources(base_path)
    quantized = bool(read_model_config(base_path).get("quantization_bit"))
    state = model.state_dict()
    opened: dict[Path, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, file in sources.items():
        if key in state:
            tensor = _cast(state[key], dtype)
        elif quantized and key.endswith(".weight_scale"):
            continue  # the scale of a layer that is float now
        else:
            if file not in opened:
                opened[file] = _read_file(file)
            tensor = opened[file][key].detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    del state, opened
    files = _write_shards(tensors, out)
    write_config(base_path, out, dtype)
    return [*files, "config.json"]


def _write_shards(tensors: dict[str, torch.Tensor], out: Path) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, "model.safetensors.index.json"]


def checkpoint_dtype(path: Path) -> str:
    """The dtype a checkpoint folder says it is stored in (config.json), float32 when it does not say."""
    config = read_model_config(path)
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return name if name in ("float16", "bfloat16", "float32") else "float32"


def write_config(base_path: Path, out: Path, dtype: torch.dtype) -> None:
    """The base's config.json with the new dtype; a base stored quantized becomes a full-weight one."""
    config = read_model_config(base_path)
    name = str(dtype).removeprefix("torch.")
    if "dtype" in config:
        config["dtype"] = name
    if "torch_dtype" in config or "dtype" not in config:
        config["torch_dtype"] = name
    if config.get("quantization_bit"):
        config["quantization_bit"] = 0
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_transformers(model, out: Path, dtype: torch.dtype) -> list[str]:
    """A transformers model (generic, GLM-4): save_pretrained in dtype, safetensors, no glmtune needed."""
    model.to(dtype)
    model.save_pretrained(out)  # config.json, generation_config.json, model*.safetensors
    return sorted(p.name for p in out.iterdir())


def copy_side_files(base_path: Path, out: Path) -> list[str]:
    """The base folder's other top-level files (tokenizer, chat template, official *.py code, licence...),
    except weights and what the export writes itself; files already in `out` are kept."""
    copied = []
    for file in sorted(base_path.iterdir()):
        name = file.name
        if (not file.is_file() or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES)
                or name.endswith(".index.json") or name.startswith("glmtune_") or (out / name).exists()):
            continue
        shutil.copy2(file, out / name)
        copied.append(name)
    return copied


def adapter_weights_file(adapter: Path) -> Path:
    """The weights file of a peft LoRA folder; a folder without them (or its config) is refused."""
    source = next((adapter / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                   if (adapter / n).is_file()), None)
    if source is None or not (adapter / "adapter_config.json").is_file():
        raise GlmtuneError(f"{adapter} lacks adapter_config.json or adapter_model.safetensors; the adapter "
                           "folder is damaged")
    if source.suffix == ".safetensors":  # reading the header finds a cut or foreign file before any model loads
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(source), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise GlmtuneError(f"cannot read {source}: {one_line(e)}") from None
    return source


def export_adapter_weights(adapter: Path, out: Path, dtype: torch.dtype) -> list[str]:
    """A LoRA adapter folder's peft files, its weights cast to dtype (as adapter_model.safetensors, also
    when the source holds adapter_model.bin)."""
    from safetensors.torch import save_file

    source = adapter_weights_file(adapter)
    try:
        weights = _read_file(source)
    except Exception as e:  # a damaged file: say which
        raise GlmtuneError(f"cannot read {source}: {e}") from None
    save_file({k: _cast(v, dtype) for k, v in weights.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy2(adapter / "adapter_config.json", out / "adapter_config.json")
    return ["adapter_config.json", "adapter_model.safetensors"]
