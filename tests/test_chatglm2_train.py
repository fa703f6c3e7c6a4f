"""ChatGLM2-6B and ChatGLM3-6B through glmtune's commands: tiny random models with the real tokenizer train
with LoRA and P-Tuning v2 (also over a quantized base), save, reload from the adapter folder alone and
generate identically; the data layouts equal the official prompt building."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from glmtune.paths import shared_dir

TOKENIZER = shared_dir() / "fixtures" / "tokenizers" / "chatglm2-6b"
pytestmark = pytest.mark.skipif(not (TOKENIZER / "tokenizer.model").is_file(),
                                reason=f"ChatGLM2/3 tokenizer fixture not found under {TOKENIZER} (set GLMTUNE_SHARED)")
FAMILIES = ["chatglm2", "chatglm3"]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_family_dir):
    return {family: tiny_family_dir(family) for family in FAMILIES}


METHODS = {
    "lora": dict(method="lora", learning_rate=2e-2, lora_dropout=0.0),
    "ptuning": dict(method="ptuning", pre_seq_len=8, learning_rate=0.1),
    "ptuning-projection": dict(method="ptuning", pre_seq_len=8, prefix_projection=True, prefix_hidden_size=32,
                               learning_rate=1e-2),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_trains_saves_reloads_and_generates_identically(tiny_dirs, small_data, tmp_path, family, method,
                                                                   train_tiny, log_values):
    from glmtune.data.formats import Message, load_samples
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
    from glmtune.methods import get_method
    from glmtune.methods.adapter import load_tuned_model, read_adapter_info
    from glmtune.models.loader import LoadedModel, load_tokenizer

    run = train_tiny(tiny_dirs[family], small_data, tmp_path / "out", **METHODS[method])
    losses = log_values(run.output_dir, "loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    eval_losses = log_values(run.output_dir, "eval_loss")
    assert eval_losses[-1] < eval_losses[0]
    info = read_adapter_info(run.adapter_dir)
    assert info["family"] == family and info["template"] == family

    tokenizer, _, path = load_tokenizer(info["base_model"])
    in_memory = LoadedModel(get_method(info["method"]).for_inference(run.model).eval(), tokenizer, family, path,
                            info["base_model"])
    reloaded, _ = load_tuned_model(None, run.adapter_dir)
    prompts = [s.prompt_messages for s in load_samples(small_data[1])[0][:3]] + [[Message("user", "你好")]]
    sampling = GenerationOptions(max_new_tokens=6)
    # token ids, not text that may decode to nothing on a tiny random model
    first = Generator(in_memory, "auto").generate_ids(prompts, sampling)
    second = Generator(reloaded, "auto").generate_ids(prompts, sampling)
    assert all(second) and sum(map(len, second)) > len(second)  # answers were generated, not only stop tokens
    assert first == second
    assert [Generator(reloaded, "auto").generate_ids([p], sampling)[0] for p in prompts] == second


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_base_stays_close_and_trains(tiny_dirs, small_data, tmp_path, family, train_tiny, log_values):
    from glmtune.models.loader import load_model
    from glmtune.models.quantization import QuantizedLinear

    full = load_model(str(tiny_dirs[family])).model.eval()
    ids = torch.tensor([[64790, 64792, 30910, 36474, 54591]])
    for bits, bound in ((8, 0.02), (4, 0.3)):
        quantized = load_model(str(tiny_dirs[family]), quantization=bits).model.eval()
        assert isinstance(quantized.transformer.encoder.layers[0].self_attention.query_key_value, QuantizedLinear)
        assert not isinstance(quantized.transformer.output_layer, QuantizedLinear)
        with torch.no_grad():
            expected, actual = full(ids).logits, quantized(ids).logits
        assert ((actual - expected).norm() / expected.norm()).item() < bound
    for method in ("lora", "ptuning"):
        run = train_tiny(tiny_dirs[family], small_data, tmp_path / method, quantization_bit=4, max_steps=6,
                         save_steps=6, **METHODS[method])
        eval_losses = log_values(run.output_dir, "eval_loss")
        assert eval_losses[-1] < eval_losses[0], method


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_trains_the_same(tiny_dirs, small_data, tmp_path, family, train_tiny, log_values):
    options = dict(max_steps=3, save_steps=3, **METHODS["ptuning"])
    plain = train_tiny(tiny_dirs[family], (small_data[0], None), tmp_path / "plain", **options)
    checkpointed = train_tiny(tiny_dirs[family], (small_data[0], None), tmp_path / "ckpt", gradient_checkpointing=True,
                          **options)
    assert checkpointed.model.transformer.gradient_checkpointing and not plain.model.transformer.gradient_checkpointing
    assert log_values(plain.output_dir, "loss") == pytest.approx(log_values(checkpointed.output_dir, "loss"), abs=1e-4)


HISTORY = [("你好", "你好！有什么可以帮你？"), ("Two  spaces\nand a line", "ok\n\nbye")]


def _conversation(past, question, answer=None, system=None):
    from glmtune.data.formats import Message

    messages = [Message("system", system)] if system else []
    messages += [m for q, a in past for m in (Message("user", q), Message("assistant", a))]
    messages.append(Message("user", question))
    return messages + ([Message("assistant", answer)] if answer is not None else [])


def _encoder(folder):
    from glmtune.data.preprocess import Encoder
    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_tokenizer, stop_token_ids

    tokenizer, family, _ = load_tokenizer(str(folder))
    return tokenizer, family, Encoder(tokenizer, get_template("auto", tokenizer, family), stop_token_ids(tokenizer))


def test_chatglm2_layout_equals_the_official_prompt_and_training_example(tiny_dirs):
    from glmtune.data.formats import Sample
    from glmtune.data.preprocess import LengthLimits
    from glmtune.models.chatglm2.tokenization import build_chat_prompt

    tokenizer, family, encoder = _encoder(tiny_dirs["chatglm2"])
    assert family == "chatglm2"
    for past in (HISTORY[:0], HISTORY[:1], HISTORY):
        ids, _ = encoder.prompt_ids(_conversation(past, "晚上睡不着怎么办"))
        assert ids == tokenizer(build_chat_prompt("晚上睡不着怎么办", past))["input_ids"]
    # ChatGLM2 ptuning/main.py: encode(prompt) + encode(answer, no specials) + [eos]; labels on answer and eos
    feature, _ = encoder.encode(Sample(_conversation(HISTORY, "问题", "回答 answer"), {}, "x"), LengthLimits())
    prompt = tokenizer(build_chat_prompt("问题", HISTORY))["input_ids"]
    answer = tokenizer.encode("回答 answer", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert feature["input_ids"] == prompt + answer
    assert feature["labels"] == [-100] * len(prompt) + answer


def test_chatglm3_layout_equals_the_official_chat_input_and_finetuning_labels(tiny_dirs):
    from chatglm_oracles import chatglm3_training_example, render_chatglm3

    from glmtune.data.formats import Sample
    from glmtune.data.preprocess import LengthLimits

    tokenizer, family, encoder = _encoder(tiny_dirs["chatglm3"])
    assert family == "chatglm3"
    assert {2, 64795, 64797} <= encoder.stop_ids
    for past in (HISTORY[:0], HISTORY):
        messages = _conversation(past, "晚上睡不着怎么办", system="You are a helpful assistant.")
        ids, _ = encoder.prompt_ids(messages)
        assert ids == render_chatglm3(tokenizer, messages).input_ids
        assert ids == tokenizer.build_chat_input("晚上睡不着怎么办", history=[
            {"role": m.role, "content": m.content} for m in messages[:-1]])["input_ids"][0].tolist()
    messages = _conversation(HISTORY, "问题", "回答 answer", system="sys")
    feature, _ = encoder.encode(Sample(messages, {}, "x"), LengthLimits())
    official = chatglm3_training_example(tokenizer, messages)
    assert feature["input_ids"] == official["input_ids"]
    assert feature["labels"] == official["labels"]


def test_int4_checkpoint_loads_as_it_is(tiny_dirs, tmp_path):
    """chatglm2-6b-int4 layout: quantization_bit in config.json, int8 `weight` (packed int4) and fp16
    `weight_scale` for the encoder's linear layers, pytorch_model.bin."""
    from glmtune.models.loader import load_model

    source = tiny_dirs["chatglm2"]
    quantized = load_model(str(source), quantization=4).model.eval()
    folder = tmp_path / "chatglm2-6b-int4"
    folder.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["quantization_bit"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    state = quantized.state_dict()
    assert state["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"].dtype == torch.int8
    torch.save(state, folder / "pytorch_model.bin")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(source / name, folder)
    loaded = load_model(str(folder))
    assert loaded.quantization_bit == 4 and loaded.family == "chatglm2"
    ids = torch.tensor([[64790, 64792, 30910, 36474, 54591]])
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(ids).logits, quantized(ids).logits)


def test_official_ptuning_checkpoint_loads(tiny_dirs, tmp_path):
    """ChatGLM2's ptuning/main.py saves pytorch_model.bin with transformer.prefix_encoder.* only."""
    from glmtune.errors import GlmtuneError
    from glmtune.methods.adapter import load_tuned_model
    from glmtune.models.loader import load_model

    model = load_model(str(tiny_dirs["chatglm2"])).model
    model.transformer.enable_prefix(6, projection=True)
    prefix = {f"transformer.prefix_encoder.{k}": v for k, v in model.transformer.prefix_encoder.state_dict().items()}
    official = tmp_path / "checkpoint-1000"
    official.mkdir()
    torch.save(prefix, official / "pytorch_model.bin")
    (official / "config.json").write_text(json.dumps({"pre_seq_len": 6, "prefix_projection": True}))
    loaded, info = load_tuned_model(str(tiny_dirs["chatglm2"]), official)
    assert info["parameters"]["prefix_projection"] and info["parameters"]["pre_seq_len"] == 6
    encoder = loaded.model.transformer.prefix_encoder
    assert torch.equal(encoder.trans[2].weight, prefix["transformer.prefix_encoder.trans.2.weight"])
    with pytest.raises(GlmtuneError, match="pre_seq_len 6"):
        load_tuned_model(str(tiny_dirs["chatglm2"]), official, pre_seq_len=7)
