"""The native ChatGLM2/3 model against the official code's outputs (fixtures/golden/chatglm2 and chatglm3;
the two share the architecture and the weights, only the prompt layout differs). Tolerance 1e-4 at valid
positions, as the fixtures' README advises."""

from __future__ import annotations

import json

import pytest
import torch

from glmtune.paths import shared_dir

GOLDEN = shared_dir() / "fixtures" / "golden"
CONFIGS = shared_dir() / "fixtures" / "tokenizers" / "chatglm2-6b"
ATOL = 1e-4
FAMILIES = ["chatglm2", "chatglm3"]

needs_golden = pytest.mark.skipif(not (GOLDEN / "chatglm2" / "golden.safetensors").is_file(),
                                  reason=f"golden ChatGLM2/3 fixtures not found under {GOLDEN} (set GLMTUNE_SHARED)")


def _model(family: str, config_name: str = "config.json", attn: str = "sdpa", extra: str | None = None):
    from safetensors.torch import load_file

    from glmtune.models.chatglm2.configuration import ChatGLM2Config
    from glmtune.models.chatglm2.modeling import ChatGLM2ForConditionalGeneration

    config = ChatGLM2Config.from_pretrained(GOLDEN / family / config_name)
    config._attn_implementation = attn
    model = ChatGLM2ForConditionalGeneration(config).eval()
    state = load_file(GOLDEN / family / "model.safetensors")
    if extra:
        state.update(load_file(GOLDEN / family / extra))
    result = model.load_state_dict({k: v for k, v in state.items() if "inv_freq" not in k}, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def _golden(family):
    from safetensors.torch import load_file

    return load_file(GOLDEN / family / "golden.safetensors")


def _close_at(actual, expected, valid):
    assert (actual - expected)[valid].abs().max().item() < ATOL


@needs_golden
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_official_logits_hidden_states_and_cache(family, attn):
    golden, model = _golden(family), _model(family, attn=attn)
    ids, mask = golden["infer.input_ids"], golden["infer.attention_mask"]
    valid = mask.bool()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=golden["infer.position_ids"], output_hidden_states=True,
                    use_cache=True)
        derived = model(ids, attention_mask=mask)  # positions derived from the padding mask
    _close_at(out.logits, golden["infer.logits"], valid)
    _close_at(derived.logits, golden["infer.logits"], valid)
    assert len(out.hidden_states) == 4
    for i, hidden in enumerate(out.hidden_states):
        _close_at(hidden, golden[f"infer.hidden_states.{i}"], valid)
    for i, layer in enumerate(out.past_key_values.layers):  # the official cache is [seq, batch, groups, dim]
        _close_at(layer.keys.permute(2, 0, 1, 3), golden[f"infer.present.{i}.key"], valid.T)
        _close_at(layer.values.permute(2, 0, 1, 3), golden[f"infer.present.{i}.value"], valid.T)


@needs_golden
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_greedy_generation_match_official(family):
    golden, model = _golden(family), _model(family)
    ids, mask = golden["infer.input_ids"], golden["infer.attention_mask"]
    with torch.no_grad():
        train = model(golden["train.input_ids"], labels=golden["train.labels"])
        padded = model(golden["train.input_ids"], labels=golden["train.labels"],
                       attention_mask=(golden["train.input_ids"] != 0).long())
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        with_positions = model.generate(ids, attention_mask=mask, position_ids=golden["infer.position_ids"],
                                        max_new_tokens=8, do_sample=False)
        no_cache = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert abs(train.loss.item() - golden["train.loss"].item()) < ATOL
    assert abs(padded.loss.item() - golden["train.loss"].item()) < ATOL
    assert (train.logits - golden["train.logits"]).abs().max().item() < ATOL
    for sequences in (generated, with_positions, no_cache):
        assert torch.equal(sequences, golden["generate.sequences"])


@needs_golden
@pytest.mark.parametrize("tag", ["ptuning_noproj", "ptuning_proj"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ptuning_v2_matches_official(family, tag):
    golden = _golden(family)
    model = _model(family, f"{tag}.config.json", extra=f"{tag}.prefix_encoder.safetensors")
    ids, mask = golden["infer.input_ids"], golden["infer.attention_mask"]
    expected_loss = json.loads((GOLDEN / family / "golden.json").read_text())["results"][f"{tag}.train.loss"]
    with torch.no_grad():
        for i, (key, value) in enumerate(model.transformer.prefix_key_values(2, torch.float32, "cpu")):
            assert torch.allclose(key.permute(2, 0, 1, 3), golden[f"{tag}.prompt.{i}.key"], atol=1e-6)
            assert torch.allclose(value.permute(2, 0, 1, 3), golden[f"{tag}.prompt.{i}.value"], atol=1e-6)
        logits = model(ids, attention_mask=mask, position_ids=golden["infer.position_ids"]).logits
        loss = model(golden["train.input_ids"], labels=golden["train.labels"]).loss
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    _close_at(logits, golden[f"{tag}.infer.logits"], mask.bool())
    assert abs(loss.item() - expected_loss) < ATOL
    assert torch.equal(generated, golden[f"{tag}.generate.sequences"])


@needs_golden
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(check_checkpointing):
    golden = _golden("chatglm2")
    model = _model("chatglm2", "ptuning_proj.config.json", extra="ptuning_proj.prefix_encoder.safetensors").train()
    model.transformer.prefix_dropout.p = 0.0  # compare deterministic passes
    grads = check_checkpointing(model, {"input_ids": golden["train.input_ids"], "labels": golden["train.labels"]})
    assert "transformer.prefix_encoder.embedding.weight" in grads


def _tiny(**overrides):
    from glmtune.models.chatglm2.configuration import ChatGLM2Config
    from glmtune.models.chatglm2.modeling import ChatGLM2ForConditionalGeneration

    settings = dict(num_layers=2, padded_vocab_size=128, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                    num_attention_heads=4, seq_length=64, add_qkv_bias=True, initializer_range=0.1)
    settings.update(overrides)
    torch.manual_seed(0)
    return ChatGLM2ForConditionalGeneration(ChatGLM2Config(**settings)).eval()


def test_without_multi_query_each_head_reads_its_own_query_key_value_block():
    """multi_query_attention off lays the projection out per head as [q | k | v]; with one group per head
    on, it is [all q | all k | all v]. The same weights, rearranged, must give the same model."""
    separate = _tiny(multi_query_attention=False)
    grouped = _tiny(multi_query_attention=True, multi_query_group_num=4)
    state = separate.state_dict()
    for i in range(2):
        for kind in ("weight", "bias"):
            name = f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"
            per_head = state[name].unflatten(0, (4, 3, 16))  # head, q/k/v, dim
            state[name] = per_head.transpose(0, 1).flatten(0, 2)
    grouped.load_state_dict(state)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(separate(ids).logits, grouped(ids).logits, atol=1e-5)


def test_rope_ratio_interpolates_positions_for_chatglm2_and_scales_the_base_for_chatglm3():
    from glmtune.models.chatglm2.configuration import ChatGLM2Config
    from glmtune.models.chatglm2.modeling import rotary_table

    positions = torch.tensor([[0, 4, 8]])
    plain = rotary_table(ChatGLM2Config(kv_channels=16), positions // 4, torch.float32)
    interpolated = rotary_table(ChatGLM2Config(kv_channels=16, rope_ratio=4, rope_interpolates_positions=True),
                                positions, torch.float32)
    assert torch.allclose(plain, interpolated, atol=1e-6)
    scaled = rotary_table(ChatGLM2Config(kv_channels=16, rope_ratio=50), positions, torch.float32)
    theta = 1.0 / (10000.0 * 50) ** (torch.arange(0, 8, 2).float() / 8)
    assert torch.allclose(scaled[0, 2, 0, :, 0], torch.cos(8 * theta), atol=1e-6)


@pytest.mark.skipif(not (CONFIGS / "official_config.chatglm3.json").is_file(),
                    reason=f"official ChatGLM2/3 configs not found under {CONFIGS} (set GLMTUNE_SHARED)")
@pytest.mark.parametrize("name", ["official_config.chatglm2.json", "official_config.chatglm3.json"])
def test_the_real_6b_configs_build_with_the_official_shapes(name):
    from glmtune.models.chatglm2.configuration import ChatGLM2Config
    from glmtune.models.chatglm2.modeling import ChatGLM2ForConditionalGeneration

    config = ChatGLM2Config.from_pretrained(CONFIGS / name)
    with torch.device("meta"):
        model = ChatGLM2ForConditionalGeneration(config)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert round(total / 1e9, 2) == 6.24
    assert params["transformer.embedding.word_embeddings.weight"].shape == (65024, 4096)
    assert params["transformer.output_layer.weight"].shape == (65024, 4096)  # untied
    qkv = params["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert qkv.shape == (4096 + 2 * 2 * 128, 4096)  # 32 query heads, 2 key/value groups of 128
    assert params["transformer.encoder.layers.0.self_attention.query_key_value.bias"].shape == (4608,)
    assert params["transformer.encoder.layers.27.mlp.dense_h_to_4h.weight"].shape == (2 * 13696, 4096)
    assert params["transformer.encoder.layers.27.mlp.dense_4h_to_h.weight"].shape == (4096, 13696)
    assert params["transformer.encoder.final_layernorm.weight"].shape == (4096,)


@pytest.mark.parametrize("options", [
    dict(rmsnorm=False, post_layer_norm=False, add_bias_linear=True),
    dict(apply_residual_connection_post_layernorm=True, multi_query_attention=True, multi_query_group_num=1),
    dict(multi_query_attention=True, multi_query_group_num=4, hidden_dropout=0.1),
])
def test_every_config_switch_builds_runs_and_generates_with_a_cache(options):
    model = _tiny(**options)
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.isfinite(logits).all()
    assert torch.equal(cached, uncached)
    names = dict(model.named_parameters())
    assert ("transformer.encoder.layers.0.input_layernorm.bias" in names) == (not model.config.rmsnorm)
    assert ("transformer.encoder.final_layernorm.weight" in names) == model.config.post_layer_norm
