"""P-Tuning v2 for transformers' own models (GLM-4, Llama, SmolLM2, Qwen2/3, ...): a trained key/value
prefix in front of every attention layer, the base frozen.

peft keeps the prefix in the KV cache. transformers drops the cache inside a layer that recomputes its
activations (gradient checkpointing) and reshapes caches from release to release, so glmtune puts the
prefix one step later, in the attention function itself:

- a forward pre-hook on the decoder computes the prefix once per forward and passes it down as a keyword
  argument, which transformers hands unchanged to every layer's attention function;
- the attention function (registered as `glmtune_prefix_sdpa` / `glmtune_prefix_eager`) puts the layer's
  prefix keys and values in front of the real ones, after rotary embedding (the prefix has no position) and
  after the cache update (the cache keeps real tokens only, so cache positions and position ids are the
  ones the model would have without a prefix), and opens the mask over the prefix for every query row;
- then the model's usual SDPA or eager attention runs.

This is exactly a forward given the prefix as an explicit past (tests/test_prefix_attention.py proves it).

The prefix starts as the keys and values the model itself computes for `pre_seq_len` random vocabulary
tokens, as if the text followed a short real context (prefix-tuning's "real activations" start). A prefix
drawn from N(0, 1), as ChatGLM's official code does, gives keys and values unlike any the model computes; from
real activations the untrained prefix leaves the model's loss where it was (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from glmtune.errors import GlmtuneError
from glmtune.models.prefix import PrefixEncoder

log = logging.getLogger(__name__)

PREFIX_KWARG = "glmtune_prefix"  # the keyword the prefix travels under, from the decoder to attention
INNER_IMPLEMENTATIONS = ("sdpa", "eager")
ENCODER_NAME = "prefix_encoder"  # the submodule of the causal LM; its parameters are `prefix_encoder.*`


@dataclass(frozen=True)
class PrefixShape:
    """What one layer's prefix must look like, read from the model config."""

    num_layers: int
    kv_heads: int
    key_dim: int
    value_dim: int

    @property
    def width(self) -> int:
        """The prefix encoder's output per prefix position: every layer's keys, then its values."""
        return self.num_layers * self.kv_heads * (self.key_dim + self.value_dim)


def prefix_shape(config) -> PrefixShape:
    """Layers, key/value heads and head dims: grouped and multi-query attention (`num_key_value_heads`),
    an explicit `head_dim` that differs from hidden/heads, and separate key and value dims (MLA)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    nope, rope = getattr(text, "qk_nope_head_dim", None), getattr(text, "qk_rope_head_dim", None)
    key_dim = nope + rope if nope and rope else head_dim
    return PrefixShape(num_layers=text.num_hidden_layers,
                       kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                       key_dim=key_dim, value_dim=getattr(text, "v_head_dim", None) or key_dim)


def split_layers(flat: torch.Tensor, shape: PrefixShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[pre_seq_len, width] -> per layer (key [kv_heads, pre_seq_len, key_dim], value [.., value_dim])."""
    length = flat.shape[0]
    keys, values = flat.reshape(length, shape.num_layers, shape.kv_heads * (shape.key_dim + shape.value_dim)).split(
        [shape.kv_heads * shape.key_dim, shape.kv_heads * shape.value_dim], dim=-1)
    keys = keys.reshape(length, shape.num_layers, shape.kv_heads, shape.key_dim).permute(1, 2, 0, 3)
    values = values.reshape(length, shape.num_layers, shape.kv_heads, shape.value_dim).permute(1, 2, 0, 3)
    return list(zip(keys.unbind(0), values.unbind(0)))


def _open_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, prefix_len: int,
               additive: bool) -> torch.Tensor:
    """The layer's mask with `prefix_len` visible columns in front. Without a mask (plain causal attention)
    the causal mask is built first, aligned to the last key as the cache requires."""
    if mask is None:
        q_len, kv_len = query.shape[2], key.shape[2]
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows)[None, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    if mask.dtype == torch.bool:
        visible = torch.ones(*mask.shape[:-1], prefix_len, dtype=torch.bool, device=mask.device)
    else:
        visible = torch.zeros(*mask.shape[:-1], prefix_len, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask], dim=-1)


def _eager_of(module):
    """The eager attention function of the module's own modeling file (some models change eager's maths)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    return eager


def _prefixed(inner: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        prefixes = kwargs.pop(PREFIX_KWARG, None)
        if prefixes is not None:
            prefix_key, prefix_value = prefixes[module.layer_idx]
            if prefix_key.shape[0] != key.shape[1] or prefix_key.shape[-1] != key.shape[-1] \
                    or prefix_value.shape[-1] != value.shape[-1]:
                raise GlmtuneError(
                    f"the P-Tuning prefix does not fit layer {module.layer_idx}: its keys are "
                    f"{tuple(prefix_key.shape)} (heads, length, dim) but the layer's are {key.shape[1]} heads of "
                    f"{key.shape[-1]}; this architecture's config does not describe its attention shapes")
            batch = key.shape[0]
            key = torch.cat([prefix_key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix_value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
            attention_mask = _open_mask(attention_mask, query, key[:, :, prefix_key.shape[1]:], prefix_key.shape[1],
                                        additive=inner == "eager")
        if inner == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return _eager_of(module)(module, query, key, value, attention_mask, **kwargs)

    return attention


def _materialised(mask_function):
    """The mask maker of the inner implementation, made to always return a mask (never "rely on
    is_causal"), since the prefix columns are joined to it."""
    def make(*args, **kwargs):
        kwargs["allow_is_causal_skip"] = False
        return mask_function(*args, **kwargs)

    return make


def register_implementations() -> None:
    """Register `glmtune_prefix_sdpa` and `glmtune_prefix_eager` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    makers = {"sdpa": sdpa_mask, "eager": eager_mask}
    for inner in INNER_IMPLEMENTATIONS:
        name = f"glmtune_prefix_{inner}"
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _prefixed(inner))
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, _materialised(makers[inner]))


def real_token_states(model, shape: PrefixShape, length: int) -> torch.Tensor | None:
    """[length, shape.width]: the keys and values `model` computes for `length` random vocabulary tokens, in
    the prefix encoder's layout; None where the model's cache does not hold plain per-layer keys and values."""
    rows = model.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(0, rows, (1, length), device=model.get_input_embeddings().weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = model(input_ids=tokens, use_cache=True).past_key_values
        layers = [(cache.layers[i].keys[0], cache.layers[i].values[0]) for i in range(shape.num_layers)]
    except (AttributeError, IndexError, TypeError):
        return None
    finally:
        model.train(was_training)
    expected = ((shape.kv_heads, length, shape.key_dim), (shape.kv_heads, length, shape.value_dim))
    if any((tuple(k.shape), tuple(v.shape)) != expected for k, v in layers):
        return None
    return torch.cat([t.transpose(0, 1).reshape(length, -1) for pair in layers for t in pair], dim=-1).float()


def _decoder(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise GlmtuneError(f"P-Tuning v2 needs a decoder inside {type(model).__name__} to hook; this architecture "
                           "has none (use method: lora)")
    return decoder


def attach_prefix(model, pre_seq_len: int, *, projection: bool = False, hidden_size: int | None = None,
                  start_from_model: bool = True) -> PrefixEncoder:
    """Give a transformers causal LM a prefix encoder (fp32, so it trains under mixed precision) at
    `model.prefix_encoder`, and route its attention through the prefix. The encoder starts from the model's
    own keys and values of real tokens, or, with `start_from_model` False (weights about to be loaded),
    from its plain initialisation."""
    if not getattr(model, "_supports_attention_backend", False):
        raise GlmtuneError(f"P-Tuning v2 needs a model whose layers call transformers' attention interface; "
                           f"{type(model).__name__} does not (use method: lora)")
    current = model.config._attn_implementation
    inner = current.removeprefix("glmtune_prefix_")
    if inner not in INNER_IMPLEMENTATIONS:
        raise GlmtuneError(f"P-Tuning v2 runs on sdpa or eager attention; this model was loaded with {current}")
    if getattr(model, ENCODER_NAME, None) is not None:
        raise GlmtuneError("this model already has a P-Tuning prefix")
    shape = prefix_shape(model.config)
    # drawn before the encoder's own initialisation uses the random generator
    start = real_token_states(model, shape, pre_seq_len) if start_from_model else None
    embed = model.config.get_text_config().hidden_size
    encoder = PrefixEncoder(pre_seq_len, shape.width, projection=projection, embed_width=embed,
                            hidden_width=hidden_size or embed)
    encoder.to(model.get_input_embeddings().weight.device)
    if start is None and start_from_model:
        log.warning("P-Tuning v2: this model's cache does not expose per-layer keys and values; the prefix "
                    "starts from random values instead of the model's own")
    elif start is not None:
        encoder.start_from(start)
    model.add_module(ENCODER_NAME, encoder)
    register_implementations()
    model.set_attn_implementation(f"glmtune_prefix_{inner}")

    def add_prefix(module, args, kwargs):
        positions = torch.arange(pre_seq_len, device=encoder.embedding.weight.device)
        kwargs[PREFIX_KWARG] = split_layers(encoder(positions), shape)
        return args, kwargs

    model._glmtune_prefix_hook = _decoder(model).register_forward_pre_hook(add_prefix, with_kwargs=True)
    return encoder


def detach_prefix(model) -> None:
    """Undo attach_prefix: no encoder, no hook, the model's own attention implementation again."""
    model._glmtune_prefix_hook.remove()
    del model._glmtune_prefix_hook
    del model._modules[ENCODER_NAME]
    model.set_attn_implementation(model.config._attn_implementation.removeprefix("glmtune_prefix_"))
