"""P-Tuning v2 on transformers' own models is exact: a forward with the prefix equals a plain forward of the
same model given the prefix keys/values as an explicit past, with and without gradient checkpointing,
for grouped-query configs and a head_dim that is not hidden/heads; generation with the KV cache equals
generation without it, and a left-padded batch equals each prompt alone."""

from __future__ import annotations

import pytest
import torch

from glmtune.errors import GlmtuneError
from glmtune.models.prefix_attention import attach_prefix, prefix_shape, split_layers

PRE_SEQ_LEN = 5


def _config(kind: str, attention: str):
    from transformers import Glm4Config, LlamaConfig

    shared = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256, attn_implementation=attention, pad_token_id=0, eos_token_id=1)
    if kind == "llama-gqa":
        return LlamaConfig(num_key_value_heads=2, **shared)
    if kind == "llama-mqa-wide-heads":
        return LlamaConfig(num_key_value_heads=1, head_dim=32, **shared)
    return Glm4Config(num_key_value_heads=2, head_dim=24, **shared)  # partial rotary, head_dim * heads != hidden


def _pair(kind: str, attention: str, projection: bool):
    """(model with a prefix, the same weights without one, the prefix encoder)."""
    from transformers import AutoModelForCausalLM

    config = _config(kind, attention)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    encoder = attach_prefix(model, PRE_SEQ_LEN, projection=projection, hidden_size=48 if projection else None)
    return model, plain, encoder


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(2, 120, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _explicit_past_logits(plain, layers, ids, mask, positions):
    from transformers import DynamicCache

    cache = DynamicCache(config=plain.config)
    for index, (key, value) in enumerate(layers):
        cache.update(key[None].expand(ids.shape[0], -1, -1, -1), value[None].expand(ids.shape[0], -1, -1, -1), index)
    opened = torch.cat([torch.ones(ids.shape[0], PRE_SEQ_LEN, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return plain(input_ids=ids, attention_mask=opened, past_key_values=cache, position_ids=positions).logits


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mqa-wide-heads", "glm4"])
def test_prefix_forward_equals_explicit_past(kind, attention, projection):
    model, plain, encoder = _pair(kind, attention, projection)
    ids, mask, positions = _batch()
    layers = split_layers(encoder(torch.arange(PRE_SEQ_LEN)).detach(), prefix_shape(model.config))
    assert layers[0][0].shape == (model.config.num_key_value_heads, PRE_SEQ_LEN,
                                  model.model.layers[0].self_attn.head_dim)
    expected = _explicit_past_logits(plain, layers, ids, mask, positions)
    valid = mask.bool()

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (logits[valid] - expected[valid]).abs().max() < 1e-5

    model.train()  # no dropout in these configs, so training mode computes the same
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (checkpointed[valid].detach() - expected[valid]).abs().max() < 1e-5
    checkpointed[valid].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_gradient_checkpointing_gives_the_prefix_the_same_gradient():
    model, _, encoder = _pair("glm4", "sdpa", True)
    ids, mask, positions = _batch()
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.zero_grad()
        model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("kind", ["llama-gqa", "glm4"])
def test_generation_with_cache_left_padding_and_alone_agree(kind):
    model, _, _ = _pair(kind, "sdpa", False)
    model.eval()
    prompts = [[5, 17, 33, 9, 41, 12], [7, 8], [60, 61, 62, 63]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    settings = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **settings)[:, width:]
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **settings)[:, width:]
        alone = [model.generate(input_ids=torch.tensor([p]), **settings)[0, len(p):] for p in prompts]
    assert torch.equal(cached, uncached)
    assert all(torch.equal(cached[i], alone[i]) for i in range(len(prompts)))


def test_the_prefix_changes_the_output_and_the_cache_holds_real_tokens_only():
    model, plain, _ = _pair("llama-gqa", "sdpa", False)
    ids, mask, positions = _batch()
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask, use_cache=True)
        base = plain(input_ids=ids, attention_mask=mask).logits
    assert (tuned.logits - base).abs().max() > 1e-3
    assert tuned.past_key_values.get_seq_length() == ids.shape[1]


def test_a_model_cannot_get_two_prefixes_and_needs_sdpa_or_eager():
    from transformers import AutoModelForCausalLM

    model, _, _ = _pair("llama-gqa", "sdpa", False)
    with pytest.raises(GlmtuneError, match="already has a P-Tuning prefix"):
        attach_prefix(model, 3)
    flex = AutoModelForCausalLM.from_config(_config("llama-gqa", "sdpa"))
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(GlmtuneError, match="sdpa or eager"):
        attach_prefix(flex, 3)


def test_without_a_mask_the_causal_mask_is_built_aligned_to_the_last_key():
    from glmtune.models.prefix_attention import _open_mask

    query, key = torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 5, 8)  # 3 new tokens after 2 cached ones
    opened = _open_mask(None, query, key, 4, additive=False)
    causal = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(opened[0, 0], torch.cat([torch.ones(3, 4, dtype=torch.bool), causal], dim=1))
    additive = _open_mask(None, query, key, 4, additive=True)[0, 0]
    assert torch.equal(additive == 0, opened[0, 0]) and additive.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("projection", [False, True])
def test_the_prefix_starts_as_the_models_own_keys_and_values_of_real_tokens(projection):
    """Not N(0, 1) noise, which overwhelms a model that never saw it: the prefix begins as the keys and
    values the model computes for random vocabulary tokens (with projection, the MLP is solved to output
    them)."""
    from transformers import AutoModelForCausalLM

    config = _config("glm4", "sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(7)
    encoder = attach_prefix(model, PRE_SEQ_LEN, projection=projection, hidden_size=48 if projection else None)
    torch.manual_seed(7)
    tokens = torch.randint(0, config.vocab_size, (1, PRE_SEQ_LEN))
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prefix_encoder.")})
    with torch.no_grad():
        cache = plain(input_ids=tokens, use_cache=True).past_key_values
        layers = split_layers(encoder(torch.arange(PRE_SEQ_LEN)), prefix_shape(config))
    for index, (key, value) in enumerate(layers):
        assert torch.allclose(key, cache.layers[index].keys[0], atol=1e-4)
        assert torch.allclose(value, cache.layers[index].values[0], atol=1e-4)


def test_the_prefix_of_the_full_size_glm4_9b_fits_its_attention_layers():
    """glm-4-9b-chat-hf's shapes (built on the meta device, no weights): 40 layers, 2 key/value heads of 128."""
    from transformers import Glm4Config, Glm4ForCausalLM

    config = Glm4Config(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                        num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
                        max_position_embeddings=131072, attention_bias=True)
    with torch.device("meta"):
        model = Glm4ForCausalLM(config)
    assert 9.0e9 < sum(p.numel() for p in model.parameters()) < 9.6e9
    shape = prefix_shape(config)
    attention = model.model.layers[0].self_attn
    assert (shape.num_layers, shape.kv_heads, shape.key_dim, shape.value_dim) == (40, 2, 128, 128)
    assert attention.k_proj.out_features == shape.kv_heads * shape.key_dim
    assert attention.v_proj.out_features == shape.kv_heads * shape.value_dim
    assert shape.width == 20480  # per prefix position: 40 layers x (2 x 128 keys + 2 x 128 values)
