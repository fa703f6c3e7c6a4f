"""ChatGLM-6B through glmtune's commands: a tiny random model with the real tokenizer trains with LoRA and
P-Tuning v2 (also over an 8/4-bit quantized base), saves, reloads from the adapter folder alone and
generates identically; official P-Tuning checkpoints and int4/int8 checkpoints load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from glmtune.paths import shared_dir

TOKENIZER = shared_dir() / "fixtures" / "tokenizers" / "chatglm-6b"
pytestmark = pytest.mark.skipif(not (TOKENIZER / "ice_text.model").is_file(),
                                reason=f"ChatGLM-6B tokenizer fixture not found under {TOKENIZER} (set GLMTUNE_SHARED)")


@pytest.fixture(scope="module")
def tiny_chatglm_dir(tiny_family_dir):
    return tiny_family_dir("chatglm")


METHODS = {
    "lora": dict(method="lora", learning_rate=2e-2, lora_dropout=0.0),
    "ptuning": dict(method="ptuning", pre_seq_len=8, learning_rate=0.1),
    "ptuning-projection": dict(method="ptuning", pre_seq_len=8, prefix_projection=True, prefix_hidden_size=32,
                               learning_rate=1e-2),
}


@pytest.fixture(scope="module")
def runs(tiny_chatglm_dir, small_data, tmp_path_factory, train_tiny):
    return {name: train_tiny(tiny_chatglm_dir, small_data, tmp_path_factory.mktemp(name) / "out", **options)
            for name, options in METHODS.items()}


def _prompts(small_data):
    from glmtune.data.formats import load_samples

    samples = load_samples(small_data[1])[0]
    # prompts of different lengths, so the batch is left-padded
    return [s.prompt_messages for s in samples[:3]] + [[samples[0].messages[0].__class__("user", "你好")]]


@pytest.mark.parametrize("name", list(METHODS))
def test_tiny_chatglm_trains_saves_reloads_and_generates_identically(runs, name, small_data, log_values):
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
    from glmtune.methods import get_method
    from glmtune.methods.adapter import load_tuned_model, read_adapter_info
    from glmtune.models.loader import LoadedModel, load_tokenizer

    run = runs[name]
    losses = log_values(run.output_dir, "loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    eval_losses = log_values(run.output_dir, "eval_loss")
    assert eval_losses[-1] < eval_losses[0]

    info = read_adapter_info(run.adapter_dir)
    assert info["family"] == "chatglm" and info["template"] == "chatglm"
    files = sorted(p.name for p in run.adapter_dir.iterdir())
    if info["method"] == "ptuning":
        assert files == ["glmtune_adapter.json", "prefix_encoder.safetensors"]
        assert info["parameters"]["pre_seq_len"] == 8
        checkpoint = run.output_dir / "checkpoint-8" / "model.safetensors"
        assert checkpoint.stat().st_size < 1_000_000  # the prefix only, never the frozen base

    tokenizer, family, path = load_tokenizer(info["base_model"])
    in_memory = LoadedModel(get_method(info["method"]).for_inference(run.model).eval(), tokenizer, family, path,
                            info["base_model"])
    reloaded, _ = load_tuned_model(None, run.adapter_dir)
    prompts = _prompts(small_data)
    sampling = GenerationOptions(max_new_tokens=6)
    # token ids: the tiny random model's answers often decode to nothing (image and special tokens)
    first = Generator(in_memory, "auto").generate_ids(prompts, sampling)
    second = Generator(reloaded, "auto").generate_ids(prompts, sampling)
    assert all(second) and sum(map(len, second)) > len(second)  # answers were generated, not only stop tokens
    assert first == second
    alone = [Generator(reloaded, "auto").generate_ids([p], sampling)[0] for p in prompts]
    assert alone == second


def test_ptuning_trains_only_the_prefix(runs, tiny_chatglm_dir):
    from glmtune.models.loader import load_model

    model = runs["ptuning"].model
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["transformer.prefix_encoder.embedding.weight"]
    base = load_model(str(tiny_chatglm_dir)).model.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("transformer.prefix_encoder."):
            assert torch.equal(tensor, base[name]), name


def test_official_ptuning_checkpoint_loads_with_pre_seq_len(runs, tiny_chatglm_dir, tmp_path, capsys):
    """An official ptuning/main.py checkpoint: pytorch_model.bin with transformer.prefix_encoder.* only."""
    from safetensors.torch import load_file

    from glmtune.cli import main
    from glmtune.methods.adapter import load_tuned_model

    prefix = load_file(runs["ptuning"].adapter_dir / "prefix_encoder.safetensors")
    official = tmp_path / "checkpoint-3000"
    official.mkdir()
    torch.save(prefix, official / "pytorch_model.bin")
    loaded, info = load_tuned_model(str(tiny_chatglm_dir), official, pre_seq_len=8)
    assert info["parameters"] == {"pre_seq_len": 8, "prefix_projection": False, "prefix_hidden_size": None}
    assert torch.equal(loaded.model.transformer.prefix_encoder.embedding.weight,
                       prefix["transformer.prefix_encoder.embedding.weight"])

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"context": "你好", "target": "x"}, ensure_ascii=False) + "\n", encoding="utf-8")
    base = ["predict", "--model", str(tiny_chatglm_dir), "--adapter", str(official), "--input", str(rows),
            "--max-new-tokens", "2"]
    assert main(base + ["--output", str(tmp_path / "a.jsonl"), "--pre-seq-len", "8"]) == 0
    assert main(base + ["--output", str(tmp_path / "b.jsonl"), "--pre-seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert "pre_seq_len 8" in err and "16" in err and "Traceback" not in err
    assert main(base + ["--output", str(tmp_path / "c.jsonl")]) == 2
    assert "--pre-seq-len" in capsys.readouterr().err
    assert not (tmp_path / "b.jsonl").exists() and not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_stays_close_and_trains_with_both_methods(tiny_chatglm_dir, small_data, tmp_path, bits,
                                                                  train_tiny, log_values):
    from glmtune.models.loader import load_model
    from glmtune.models.quantization import QuantizedLinear

    full = load_model(str(tiny_chatglm_dir)).model.eval()
    quantized = load_model(str(tiny_chatglm_dir), quantization=bits).model.eval()
    assert isinstance(quantized.transformer.layers[0].attention.query_key_value, QuantizedLinear)
    ids = torch.tensor([[5, 74874, 130001, 130004, 5, 74874]])
    with torch.no_grad():
        expected, actual = full(ids).logits, quantized(ids).logits
    relative = ((actual - expected).norm() / expected.norm()).item()
    assert relative < {8: 0.02, 4: 0.3}[bits]

    for name in ("lora", "ptuning"):
        run = train_tiny(tiny_chatglm_dir, small_data, tmp_path / f"{name}-{bits}", quantization_bit=bits,
                     max_steps=6, save_steps=6, **METHODS[name])
        eval_losses = log_values(run.output_dir, "eval_loss")
        assert eval_losses[-1] < eval_losses[0], name
        from glmtune.methods.adapter import load_tuned_model

        reloaded, info = load_tuned_model(None, run.adapter_dir)  # the adapter records the quantization
        assert info["quantization_bit"] == bits
        assert isinstance(reloaded.model.transformer.layers[0].attention.query_key_value.get_base_layer()
                          if name == "lora" else reloaded.model.transformer.layers[0].attention.query_key_value,
                          QuantizedLinear)


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoint_stored_quantized_loads_as_it_is(tiny_chatglm_dir, tmp_path, bits):
    """The official int4/int8 layout: int8 `weight` (int4 packed in pairs) and fp16 `weight_scale` per
    quantized layer, `quantization_bit` in config.json, pytorch_model.bin."""
    from glmtune.models.loader import load_model

    quantized = load_model(str(tiny_chatglm_dir), quantization=bits).model.eval()
    folder = tmp_path / f"chatglm-int{bits}"
    folder.mkdir()
    config = json.loads((tiny_chatglm_dir / "config.json").read_text())
    config["quantization_bit"] = bits
    (folder / "config.json").write_text(json.dumps(config))
    state = quantized.state_dict()
    assert state["transformer.layers.0.attention.query_key_value.weight"].dtype == torch.int8
    assert state["transformer.layers.0.attention.query_key_value.weight_scale"].dtype == torch.float16
    torch.save(state, folder / "pytorch_model.bin")
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder)

    loaded = load_model(str(folder))
    assert loaded.quantization_bit == bits
    ids = torch.tensor([[5, 74874, 130001, 130004]])
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(ids).logits, quantized(ids).logits)
    with pytest.raises(Exception, match="stored quantized"):
        load_model(str(folder), quantization=12 - bits)


def test_template_prompt_equals_the_official_chat_prompt(tiny_chatglm_dir):
    from glmtune.data.formats import Message
    from glmtune.data.preprocess import Encoder
    from glmtune.data.templates import get_template
    from glmtune.models.chatglm.tokenization import build_chat_prompt
    from glmtune.models.loader import load_tokenizer

    tokenizer, family, _ = load_tokenizer(str(tiny_chatglm_dir))
    encoder = Encoder(tokenizer, get_template("auto", tokenizer, family))
    history = [("你好", "你好！有什么可以帮你？"), ("Two  spaces\nand a line", "ok")]
    for past in (history[:0], history[:1], history):
        messages = [m for q, a in past for m in (Message("user", q), Message("assistant", a))]
        messages.append(Message("user", "晚上睡不着怎么办"))
        ids, _ = encoder.prompt_ids(messages)
        assert ids == tokenizer(build_chat_prompt("晚上睡不着怎么办", past))["input_ids"]


def test_model_chat_follows_the_official_api(tiny_chatglm_dir):
    from glmtune.models.chatglm.modeling import tidy_response
    from glmtune.models.loader import load_model

    loaded = load_model(str(tiny_chatglm_dir))
    answer, history = loaded.model.chat(loaded.tokenizer, "你好", max_length=24, do_sample=False)
    assert isinstance(answer, str) and history == [("你好", answer)]
    answer2, history2 = loaded.model.chat(loaded.tokenizer, "再见", history, max_length=48, do_sample=False)
    assert history2 == [("你好", answer), ("再见", answer2)]
    assert tidy_response(" 你好,世界!ok, [[训练时间]]? ") == "你好，世界！ok, 2023年？"


def test_terminal_chat_keeps_rounds(tiny_chatglm_dir):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "glmtune", "chat", "--model", str(tiny_chatglm_dir),
                             "--max-new-tokens", "3"], input="你好\n再见\nexit\n", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2


@pytest.mark.parametrize("name", ["lora", "ptuning"])
def test_gradient_checkpointing_trains_the_same(tiny_chatglm_dir, small_data, tmp_path, name, train_tiny, log_values):
    options = dict(max_steps=3, save_steps=3, eval_on_start=False, dev_file=None, **METHODS[name])
    train = (small_data[0], None)
    plain = train_tiny(tiny_chatglm_dir, train, tmp_path / "plain", **options)
    checkpointed = train_tiny(tiny_chatglm_dir, train, tmp_path / "checkpointed", gradient_checkpointing=True,
                              **options)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.model.modules())
    first, second = log_values(plain.output_dir, "loss"), log_values(checkpointed.output_dir, "loss")
    assert len(first) == 3
    assert first == pytest.approx(second, abs=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_run_and_stay_close(tiny_chatglm_dir, dtype):
    from glmtune.models.loader import load_model

    full = load_model(str(tiny_chatglm_dir)).model.eval()
    half = load_model(str(tiny_chatglm_dir), dtype=dtype).model.eval()
    assert half.transformer.word_embeddings.weight.dtype == getattr(torch, dtype)
    ids = torch.tensor([[3, 5, 74874, 130001, 130004], [5, 74874, 6, 130001, 130004]])
    mask = (ids != 3).long()
    with torch.no_grad():
        expected = full(ids, attention_mask=mask).logits
        actual = half(ids, attention_mask=mask).logits.float()
        generated = half.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    valid = mask.bool()
    relative = ((actual - expected)[valid].norm() / expected[valid].norm()).item()
    assert relative < 0.05
    assert generated.shape == (2, 8)


def test_ptuning_picks_best_by_an_answer_metric_like_lora(tiny_chatglm_dir, small_data, tmp_path, train_tiny,
                                                          log_values):
    from glmtune.methods.adapter import read_adapter_info

    run = train_tiny(tiny_chatglm_dir, small_data, tmp_path / "run", max_steps=4, eval_steps=2, save_steps=4,
                     metric_for_best="bleu-4", early_stopping_patience=5, eval_max_new_tokens=4, **METHODS["ptuning"])
    scores = log_values(run.output_dir, "eval_bleu-4")
    assert len(scores) == len(log_values(run.output_dir, "eval_loss")) >= 2
    best = read_adapter_info(run.best_dir)
    assert best["method"] == "ptuning" and best["best_metric"] == "bleu-4" and best["best_value"] == max(scores)
    assert sorted(p.name for p in run.best_dir.iterdir()) == ["glmtune_adapter.json", "prefix_encoder.safetensors"]
