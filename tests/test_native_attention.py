"""The native ChatGLM models call their attention through transformers' AttentionInterface, and take masks
in glmtune's convention (True = may attend) besides ChatGLM-6B's official one."""

from __future__ import annotations

import pytest
import torch

NAME = "glmtune_test_recording_sdpa"


def _tiny(family: str, attn: str = "sdpa"):
    if family == "chatglm":
        from glmtune.models.chatglm.configuration import ChatGLMConfig
        from glmtune.models.chatglm.modeling import ChatGLMForConditionalGeneration

        config = ChatGLMConfig(vocab_size=300, hidden_size=32, num_layers=3, num_attention_heads=4,
                               inner_hidden_size=64, max_sequence_length=64, bos_token_id=5, eos_token_id=6,
                               mask_token_id=7, gmask_token_id=8, pad_token_id=0, initializer_range=0.2)
        model_class = ChatGLMForConditionalGeneration
    else:
        from glmtune.models.chatglm2.configuration import ChatGLM2Config
        from glmtune.models.chatglm2.modeling import ChatGLM2ForConditionalGeneration

        config = ChatGLM2Config(num_layers=3, padded_vocab_size=300, hidden_size=32, ffn_hidden_size=48,
                                kv_channels=8, num_attention_heads=4, multi_query_attention=True,
                                multi_query_group_num=2, add_qkv_bias=True, seq_length=64, initializer_range=0.2)
        model_class = ChatGLM2ForConditionalGeneration
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_class(config).eval()


def _ids(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second left-padded; ChatGLM-6B's end in [gMASK] <sop>."""
    body = [[11, 12, 13, 14, 15, 16], [0, 0, 21, 22, 23, 24]]
    ids = torch.tensor([row + [8, 5] for row in body]) if family == "chatglm" else torch.tensor(body)
    return ids, (ids != 0).long()


@pytest.fixture
def recording():
    """An attention function registered with transformers that records its calls and runs its sdpa."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, attention_mask.dtype, kwargs.get("marker")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(NAME, attention)
    yield calls
    AttentionInterface._global_mapping.pop(NAME, None)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_every_layer_calls_the_registered_attention_function_with_the_callers_keywords(family, recording):
    model = _tiny(family)
    ids, padding = _ids(family)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=padding).logits
        model.set_attn_implementation(NAME)
        got = model(input_ids=ids, attention_mask=padding, marker="seen").logits
    assert [layer for layer, _, _ in recording] == [0, 1, 2]
    assert all(marker == "seen" for _, _, marker in recording)  # keywords travel down to the attention
    # ChatGLM2/3 pass glmtune's bool mask; ChatGLM-6B the official additive one (-10000 where blocked)
    assert {dtype for _, dtype, _ in recording} == {torch.bool if family == "chatglm2" else torch.float32}
    real = padding.bool()
    assert torch.equal(got[real], expected[real])


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_eager_and_sdpa_agree(family):
    ids, padding = _ids(family)
    with torch.no_grad():
        eager = _tiny(family, "eager")(input_ids=ids, attention_mask=padding).logits
        sdpa = _tiny(family, "sdpa")(input_ids=ids, attention_mask=padding).logits
    real = padding.bool()
    assert eager[real].abs().max() > 0.1  # the logits are not all zero
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=1e-5)


def test_chatglm_takes_the_official_mask_and_attend_mask_as_inverses():
    from glmtune.models.chatglm.modeling import token_layout

    model = _tiny("chatglm")
    ids, padding = _ids("chatglm")
    positions, allowed = token_layout(ids, model.config, padding)
    assert allowed.dtype == torch.bool and bool(allowed[1, 0, 4, 2]) and not bool(allowed[1, 0, 4, 0])
    with torch.no_grad():
        official = model(input_ids=ids, attention_mask=~allowed, position_ids=positions).logits
        ours = model(input_ids=ids, attend_mask=allowed, position_ids=positions).logits
        derived = model(input_ids=ids, attention_mask=padding).logits
        wrong_way = model(input_ids=ids, attend_mask=~allowed, position_ids=positions).logits
    real = padding.bool()
    assert torch.equal(official, ours)
    torch.testing.assert_close(derived[real], ours[real], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(wrong_way[real], ours[real], atol=1e-3)  # the convention matters
    with pytest.raises(ValueError, match="attend_mask must be 4D bool"):
        model(input_ids=ids, attend_mask=allowed.float(), position_ids=positions)
