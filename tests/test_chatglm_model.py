"""The native ChatGLM-6B model against the official code's outputs (fixtures/golden/chatglm, see its README).

Tolerances: logits and losses are O(10); the official outputs were made with one thread, so compare with
atol 1e-4 at valid (non-padding) positions, as the fixture's README advises.
"""

from __future__ import annotations

import json

import pytest
import torch

from glmtune.paths import shared_dir

GOLDEN = shared_dir() / "fixtures" / "golden" / "chatglm"
OFFICIAL_CONFIG = shared_dir() / "fixtures" / "tokenizers" / "chatglm-6b" / "official_config.json"
ATOL = 1e-4

needs_golden = pytest.mark.skipif(not (GOLDEN / "golden.safetensors").is_file(),
                                  reason=f"golden ChatGLM-6B fixtures not found under {GOLDEN} (set GLMTUNE_SHARED)")


def _weights(*extra: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(GOLDEN / "model.safetensors")
    for name in extra:
        state.update(load_file(GOLDEN / name))
    return state


def _model(config_name: str = "config.json", attn: str = "sdpa", extra: tuple[str, ...] = ()):
    from glmtune.models.chatglm.configuration import ChatGLMConfig
    from glmtune.models.chatglm.modeling import ChatGLMForConditionalGeneration

    config = ChatGLMConfig.from_pretrained(GOLDEN / config_name)
    config._attn_implementation = attn
    model = ChatGLMForConditionalGeneration(config).eval()
    state = {k: v for k, v in _weights(*extra).items() if "inv_freq" not in k}
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    return load_file(GOLDEN / "golden.safetensors")


def _close_at(actual, expected, valid):
    assert (actual - expected)[valid].abs().max().item() < ATOL


@needs_golden
def test_token_layout_matches_the_official_tokenizer_padding(golden):
    from glmtune.models.chatglm.configuration import ChatGLMConfig
    from glmtune.models.chatglm.modeling import token_layout

    config = ChatGLMConfig.from_pretrained(GOLDEN)
    ids = golden["infer.input_ids"]
    # the official mask is True where attention is blocked: the inverse of token_layout's
    positions, allowed = token_layout(ids, config, (ids != config.pad_token_id).long())
    assert torch.equal(positions, golden["infer.position_ids"])
    assert torch.equal(~allowed, golden["infer.attention_mask"])
    positions, allowed = token_layout(golden["infill.input_ids"], config, torch.ones_like(golden["infill.input_ids"]))
    assert torch.equal(positions, golden["infill.position_ids"])
    assert torch.equal(~allowed, golden["infill.attention_mask"])


@needs_golden
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_matches_official_logits_hidden_states_and_cache(golden, attn):
    model = _model(attn=attn)
    ids, valid = golden["infer.input_ids"], golden["infer.valid"]
    with torch.no_grad():
        out = model(ids, attention_mask=golden["infer.attention_mask"], position_ids=golden["infer.position_ids"],
                    output_hidden_states=True, use_cache=True)
        padded = model(ids, attention_mask=valid.long())  # glmtune's 2D padding mask: same layout derived
    _close_at(out.logits, golden["infer.logits"], valid)
    _close_at(padded.logits, golden["infer.logits"], valid)
    assert len(out.hidden_states) == 4
    for i, hidden in enumerate(out.hidden_states):
        _close_at(hidden, golden[f"infer.hidden_states.{i}"], valid)
    for i, layer in enumerate(out.past_key_values.layers):
        # the official cache is [seq, batch, heads, head_dim]
        _close_at(layer.keys.permute(2, 0, 1, 3), golden[f"infer.present.{i}.key"], valid.T)
        _close_at(layer.values.permute(2, 0, 1, 3), golden[f"infer.present.{i}.value"], valid.T)


@needs_golden
def test_loss_matches_official_with_and_without_masks(golden):
    model = _model()
    ids, labels = golden["train.input_ids"], golden["train.labels"]
    expected = golden["train.loss"].item()
    with torch.no_grad():
        derived = model(ids, labels=labels)
        collator = model(ids, labels=labels, attention_mask=golden["train.collator_attention_mask"],
                         position_ids=golden["train.collator_position_ids"])
        padded = model(ids, labels=labels, attention_mask=(labels != -100) | (ids != 3))
    assert abs(derived.loss.item() - expected) < ATOL
    assert abs(collator.loss.item() - expected) < ATOL
    assert abs(padded.loss.item() - expected) < ATOL
    assert (derived.logits - golden["train.logits"]).abs().max().item() < ATOL


@needs_golden
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generation_matches_official(golden, attn):
    model = _model(attn=attn)
    ids = golden["infer.input_ids"]
    expected = golden["generate.sequences"]
    with torch.no_grad():
        official_masks = model.generate(ids, attention_mask=golden["infer.attention_mask"],
                                        position_ids=golden["infer.position_ids"], max_new_tokens=8,
                                        do_sample=False)
        padding_mask = model.generate(ids, attention_mask=(ids != 3).long(), max_new_tokens=8, do_sample=False)
        no_cache = model.generate(ids, attention_mask=(ids != 3).long(), max_new_tokens=8, do_sample=False,
                                  use_cache=False)
    assert torch.equal(official_masks, expected)
    assert torch.equal(padding_mask, expected)
    assert torch.equal(no_cache, expected)


@needs_golden
def test_mask_infill_matches_official(golden):
    model = _model()
    ids = golden["infill.input_ids"]
    with torch.no_grad():
        logits = model(ids, attention_mask=golden["infill.attention_mask"],
                       position_ids=golden["infill.position_ids"]).logits
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert (logits - golden["infill.logits"]).abs().max().item() < ATOL
    assert torch.equal(generated, golden["infill.generate.sequences"])


@needs_golden
@pytest.mark.parametrize("tag", ["ptuning_noproj", "ptuning_proj"])
def test_ptuning_v2_matches_official(golden, tag):
    model = _model(f"{tag}.config.json", extra=(f"{tag}.prefix_encoder.safetensors",))
    ids, valid = golden["infer.input_ids"], golden["infer.valid"]
    expected_loss = json.loads((GOLDEN / "golden.json").read_text())["results"][f"{tag}.train.loss"]
    with torch.no_grad():
        prompt = model.transformer.prefix_key_values(2, torch.float32, "cpu")
        for i, (key, value) in enumerate(prompt):
            assert torch.allclose(key.permute(2, 0, 1, 3), golden[f"{tag}.prompt.{i}.key"], atol=1e-6)
            assert torch.allclose(value.permute(2, 0, 1, 3), golden[f"{tag}.prompt.{i}.value"], atol=1e-6)
        logits = model(ids, attention_mask=golden["infer.attention_mask"],
                       position_ids=golden["infer.position_ids"]).logits
        loss = model(golden["train.input_ids"], labels=golden["train.labels"]).loss
        generated = model.generate(ids, attention_mask=(ids != 3).long(), max_new_tokens=8, do_sample=False)
    _close_at(logits, golden[f"{tag}.infer.logits"], valid)
    assert abs(loss.item() - expected_loss) < ATOL
    assert torch.equal(generated, golden[f"{tag}.generate.sequences"])


@needs_golden
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(golden, check_checkpointing):
    model = _model("ptuning_proj.config.json", extra=("ptuning_proj.prefix_encoder.safetensors",)).train()
    model.transformer.prefix_dropout.p = 0.0  # compare deterministic passes
    grads = check_checkpointing(model, {"input_ids": golden["train.input_ids"], "labels": golden["train.labels"]})
    assert "transformer.prefix_encoder.embedding.weight" in grads


@needs_golden
def test_loads_an_official_checkpoint_folder_with_bin_shards(golden, tmp_path):
    """config.json with the official auto_map, two pytorch_model-*.bin shards and their index."""
    from glmtune.models.chatglm.modeling import ChatGLMForConditionalGeneration

    state = _weights()
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    index = {"metadata": {}, "weight_map": {}}
    for n, part in enumerate(halves, 1):
        shard = f"pytorch_model-{n:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / shard)
        index["weight_map"].update({k: shard for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((GOLDEN / "config.json").read_text())
    model = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()
    ids, valid = golden["infer.input_ids"], golden["infer.valid"]
    with torch.no_grad():
        logits = model(ids, attention_mask=valid.long()).logits
    _close_at(logits, golden["infer.logits"], valid)


@pytest.mark.skipif(not OFFICIAL_CONFIG.is_file(), reason=f"{OFFICIAL_CONFIG} not found (set GLMTUNE_SHARED)")
def test_the_real_6b_config_builds_with_the_official_shapes():
    from glmtune.models.chatglm.configuration import ChatGLMConfig
    from glmtune.models.chatglm.modeling import ChatGLMForConditionalGeneration

    config = ChatGLMConfig.from_pretrained(OFFICIAL_CONFIG)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    params = dict(model.named_parameters())  # tied lm_head is listed once
    total = sum(p.numel() for p in params.values())
    assert round(total / 1e9, 2) == 6.17
    assert total == 6_173_286_400
    assert params["transformer.word_embeddings.weight"].shape == (130528, 4096)
    assert params["transformer.layers.27.attention.query_key_value.weight"].shape == (3 * 4096, 4096)
    assert params["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape == (16384, 4096)
    assert params["transformer.layers.0.mlp.dense_4h_to_h.weight"].shape == (4096, 16384)
    assert params["transformer.final_layernorm.weight"].shape == (4096,)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
