"""The method-by-family matrix of the README, end to end: for every family (ChatGLM-6B, ChatGLM2-6B,
ChatGLM3-6B, GLM-4, any transformers causal LM) and every method (LoRA, P-Tuning v2, QLoRA), a tiny random
model trains through `glmtune train` (the loss goes down), saves, reloads from the adapter folder alone
and answers a left-padded batch exactly as the trained model in memory did."""

from __future__ import annotations

import json

import pytest
import torch

FAMILIES = ["chatglm", "chatglm2", "chatglm3", "glm4", "generic"]
METHODS = {
    "lora": dict(method="lora", learning_rate=2e-2, lora_dropout=0.0),
    "ptuning": dict(method="ptuning", pre_seq_len=8, learning_rate=0.1),
    "qlora": dict(method="qlora", learning_rate=2e-2, lora_dropout=0.0),
}
ADAPTER_FILES = {"lora": "adapter_model.safetensors", "qlora": "adapter_model.safetensors",
                 "ptuning": "prefix_encoder.safetensors"}


def _prompts(dev_file):
    from glmtune.data.formats import Message, load_samples

    samples = load_samples(dev_file)[0]
    return [s.prompt_messages for s in samples[:3]] + [[Message("user", "你好")]]  # lengths differ: left padding


@pytest.mark.parametrize("method", ["lora", "ptuning"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_and_method_train_save_reload_and_generate_identically(family, method, tiny_family_dir, small_data,
                                                                      tmp_path, train_tiny, log_values):
    _train_save_reload_and_generate(family, method, tiny_family_dir, small_data, tmp_path, train_tiny, log_values)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_on_every_family_and_both_bitsandbytes_cpu_paths(family, bitsandbytes_cpu_path, tiny_family_dir,
                                                               small_data, tmp_path, train_tiny, log_values):
    """QLoRA as above, once on each of bitsandbytes' CPU code paths (see the fixture), whatever this CPU is."""
    _train_save_reload_and_generate(family, "qlora", tiny_family_dir, small_data, tmp_path, train_tiny, log_values)


def _train_save_reload_and_generate(family, method, tiny_family_dir, small_data, tmp_path, train_tiny, log_values):
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
    from glmtune.methods import get_method
    from glmtune.methods.adapter import load_tuned_model, read_adapter_info
    from glmtune.models.loader import LoadedModel, load_tokenizer

    folder = tiny_family_dir(family)
    run = train_tiny(folder, small_data, tmp_path / "out", **METHODS[method])
    losses = log_values(run.output_dir, "loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    eval_losses = log_values(run.output_dir, "eval_loss")
    assert eval_losses[-1] < eval_losses[0]

    info = read_adapter_info(run.adapter_dir)
    assert (info["family"], info["method"]) == (family, method)
    assert (run.adapter_dir / ADAPTER_FILES[method]).is_file()
    assert info["quantization"]["bits"] == (4 if method == "qlora" else 0)
    trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trained and all(("lora_" in n) if method != "ptuning" else ("prefix_encoder" in n) for n in trained)

    tokenizer, _, path = load_tokenizer(info["base_model"])
    in_memory = LoadedModel(get_method(method).for_inference(run.model).eval(), tokenizer, family, path,
                            info["base_model"])
    reloaded, _ = load_tuned_model(None, run.adapter_dir)
    assert reloaded.quantization_bit == info["quantization"]["bits"]
    prompts = _prompts(small_data[1])
    sampling = GenerationOptions(max_new_tokens=6)
    # token ids, not text: a tiny random model's answers may decode to nothing (special or unknown tokens)
    batch = Generator(reloaded, info["template"]).generate_ids(prompts, sampling)
    assert all(batch) and sum(map(len, batch)) > len(batch)  # answers were generated, not only stop tokens
    assert Generator(in_memory, info["template"]).generate_ids(prompts, sampling) == batch
    assert [Generator(reloaded, info["template"]).generate_ids([p], sampling)[0] for p in prompts] == batch


def test_glm4_uses_its_official_layout_and_stops_at_the_next_role(tiny_family_dir):
    from glmtune.data.formats import Message
    from glmtune.data.preprocess import Encoder
    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_model

    loaded = load_model(str(tiny_family_dir("glm4")))
    tokenizer = loaded.tokenizer
    assert loaded.family == "glm4"
    ids = tokenizer.convert_tokens_to_ids
    assert {ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")} <= loaded.stop_ids
    conversation = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
                    Message("user", "Name a colour."), Message("assistant", "Blue.")]
    own = get_template("auto", tokenizer, "glm4")
    assert own.name == "glm4"  # although the tokenizer has a chat template
    chat = get_template("chat", tokenizer, "glm4")  # still allowed
    prompts = [Encoder(tokenizer, t, loaded.stop_ids).prompt_ids(conversation[:2])[0] for t in (own, chat)]
    assert prompts[0] == prompts[1]  # a question: GLM-4's chat template, token for token
    prompt, _ = Encoder(tokenizer, own, loaded.stop_ids).prompt_ids(conversation[:4])
    assert tokenizer.decode(prompt).endswith("<|assistant|>\nHello!<|user|>\nName a colour.<|assistant|>")
    encoded = Encoder(tokenizer, own, loaded.stop_ids).encode(_sample(conversation), _no_limits())[0]
    text = tokenizer.decode(encoded["input_ids"])
    # as the official fine-tuning: turns follow each other with no end token between them, each answer trains up
    # to the next role token, and <|user|> ends the sample
    assert text == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello!<|user|>\nName a colour."
                    "<|assistant|>\nBlue.<|user|>")
    trained = tokenizer.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100])
    assert trained == "\nHello!<|user|>\nBlue.<|user|>"


def _sample(messages):
    from glmtune.data.formats import Sample

    return Sample(messages=messages, row={})


def _no_limits():
    from glmtune.data.preprocess import LengthLimits

    return LengthLimits()


def test_glm4_without_a_chat_template_falls_back_to_its_own_layout(tiny_family_dir, tmp_path):
    import shutil

    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_tokenizer

    folder = tmp_path / "glm4-no-template"
    shutil.copytree(tiny_family_dir("glm4"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer, family, _ = load_tokenizer(str(folder))
    assert family == "glm4" and not tokenizer.chat_template
    assert get_template("auto", tokenizer, family).name == "glm4"


@pytest.mark.parametrize("family", ["glm4", "generic"])
def test_ptuning_on_transformers_models_resumes_to_the_uninterrupted_result(family, tiny_family_dir, small_data,
                                                                            tmp_path, train_tiny):
    """Checkpoints of a P-Tuning run hold only the prefix (prefix_encoder.*); a run cut after its first
    checkpoint and resumed ends with the prefix of the run that was never cut."""
    import shutil

    from safetensors.torch import load_file

    options = dict(method="ptuning", pre_seq_len=8, learning_rate=0.1, max_steps=6, save_steps=3, save_total_limit=3)
    whole = train_tiny(tiny_family_dir(family), (small_data[0], None), tmp_path / "whole", **options)
    checkpoint = load_file(whole.output_dir / "checkpoint-3" / "model.safetensors")
    assert set(checkpoint) == {"prefix_encoder.embedding.weight"}
    cut = tmp_path / "cut"
    shutil.copytree(whole.output_dir / "checkpoint-3", cut / "checkpoint-3")  # as if killed after step 3
    resumed = train_tiny(tiny_family_dir(family), (small_data[0], None), cut, resume=True, **options)
    expected = load_file(whole.adapter_dir / "prefix_encoder.safetensors")
    actual = load_file(resumed.adapter_dir / "prefix_encoder.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.allclose(tensor, actual[name], atol=1e-5), name


def test_glm4_p_tuning_through_the_commands_train_predict_and_chat(tiny_family_dir, small_data, tmp_path, capsys):
    """`glmtune train`, `predict` and `chat` on a GLM-4 checkpoint, the adapter named alone."""
    import os
    import subprocess
    import sys

    from glmtune.cli import main

    out = tmp_path / "run"
    assert main(["train", f"model={tiny_family_dir('glm4')}", f"train_file={small_data[0]}", f"output_dir={out}",
                 "method=ptuning", "pre_seq_len=4", "max_steps=2", "batch_size=4"]) == 0
    predictions = tmp_path / "predictions.jsonl"
    assert main(["predict", "--adapter", str(out / "adapter"), "--input", str(small_data[1]), "--output",
                 str(predictions), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["prediction"], str) for r in rows)
    chat = subprocess.run([sys.executable, "-m", "glmtune", "chat", "--adapter", str(out / "adapter"),
                           "--max-new-tokens", "4"], input="你好\nexit\n", capture_output=True, text=True,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"), timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 1 and "Traceback" not in chat.stderr


def test_a_prefix_as_long_as_the_context_is_refused_before_anything_is_written(tiny_model_dir, small_data, tmp_path,
                                                                               capsys):
    from glmtune.cli import main

    out = tmp_path / "run"
    assert main(["train", f"model={tiny_model_dir}", f"train_file={small_data[0]}", f"output_dir={out}",
                 "method=ptuning", "pre_seq_len=1024"]) == 2
    assert "pre_seq_len 1024 leaves no room for text: the model's context is 1024" in capsys.readouterr().err
    assert not out.exists()
