"""Quantization options: which backend a family gets, what method qlora asks for, what an adapter records
and how a later command overrides it, and the errors where bitsandbytes cannot run."""

from __future__ import annotations

import importlib.util

import pytest

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.models.kbit import Quantization
from glmtune.train.trainer import requested_quantization

needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed (make setup installs it)")


def test_the_auto_backend_is_chatglms_own_layout_for_chatglm_and_bitsandbytes_for_the_rest():
    for family in ("chatglm", "chatglm2", "chatglm3"):
        assert Quantization(bits=4).for_family(family).backend == "chatglm"
    for family in ("glm4", "generic"):
        assert Quantization(bits=8).for_family(family).backend == "bitsandbytes"
    assert Quantization(bits=0, backend="chatglm").for_family("generic") == Quantization()
    with pytest.raises(GlmtuneError, match="ChatGLM-6B/2/3's own int layout"):
        Quantization(bits=4, backend="chatglm").for_family("glm4")
    with pytest.raises(GlmtuneError, match="0, 4 or 8"):
        Quantization(bits=3)


def test_qlora_asks_for_a_4bit_nf4_bitsandbytes_base_unless_told_otherwise():
    assert requested_quantization(TrainConfig(method="qlora")) == Quantization(4, "bitsandbytes", "nf4", True)
    assert requested_quantization(TrainConfig(method="qlora", quantization_bit=8)).bits == 8
    assert requested_quantization(TrainConfig(method="qlora", quantization_type="fp4", double_quantization=False)) \
        == Quantization(4, "bitsandbytes", "fp4", False)
    assert requested_quantization(TrainConfig(method="lora")) == Quantization()
    assert requested_quantization(TrainConfig(method="ptuning", quantization_bit=8)) == Quantization(8)
    with pytest.raises(GlmtuneError, match="quantization_bit 0 is method lora"):
        requested_quantization(TrainConfig(method="qlora", quantization_bit=0))
    with pytest.raises(GlmtuneError, match="method qlora quantizes the base with bitsandbytes"):
        requested_quantization(TrainConfig(method="qlora", quantization_backend="chatglm"))


def test_an_adapters_record_is_used_unless_a_command_overrides_its_bits():
    recorded = Quantization.from_record({"quantization": {"bits": 4, "backend": "bitsandbytes", "quant_type": "fp4",
                                                          "double_quant": False}})
    assert Quantization.chosen(recorded, None) == recorded
    assert Quantization.chosen(recorded, 8) == Quantization(8, "bitsandbytes", "fp4", False)
    assert Quantization.chosen(recorded, 0) == Quantization()
    assert Quantization.from_record({"quantization_bit": 8}) == Quantization(8)  # adapters from before backends
    assert Quantization.from_record(None) == Quantization()


def test_without_bitsandbytes_qlora_stops_before_writing_with_what_to_do(monkeypatch, tiny_model_dir, small_data,
                                                                         tmp_path):
    import glmtune.models.kbit as kbit
    from glmtune.train.trainer import run_training

    monkeypatch.setattr(kbit, "bitsandbytes_problem", lambda device: "the bitsandbytes package is not installed")
    out = tmp_path / "run"
    with pytest.raises(GlmtuneError) as error:
        run_training(TrainConfig(model=str(tiny_model_dir), train_file=str(small_data[0]), method="qlora",
                                 output_dir=str(out), max_steps=1))
    message = str(error.value)
    assert "the bitsandbytes package is not installed" in message and "method lora" in message
    assert "quantization_backend: chatglm" not in message  # not a ChatGLM model, so not offered
    assert not out.exists()


@needs_bitsandbytes
def test_bitsandbytes_runs_on_this_machines_cpu():
    from glmtune.models.kbit import bitsandbytes_problem

    assert bitsandbytes_problem("cpu") is None


@needs_bitsandbytes
@pytest.mark.parametrize("bits", [4, 8])
def test_ptuning_over_a_bitsandbytes_base_trains_and_reloads(bits, tiny_family_dir, small_data, tmp_path, train_tiny,
                                                             log_values):
    from glmtune.evaluate.generate import Generator, Sampling
    from glmtune.data.formats import load_samples
    from glmtune.methods.adapter import load_tuned_model, read_adapter_info
    from glmtune.models.loader import LoadedModel, load_tokenizer

    run = train_tiny(tiny_family_dir("glm4"), small_data, tmp_path / "out", method="ptuning", pre_seq_len=8,
                     learning_rate=0.1, quantization_bit=bits)
    eval_losses = log_values(run.output_dir, "eval_loss")
    assert eval_losses[-1] < eval_losses[0]
    info = read_adapter_info(run.adapter_dir)
    assert info["quantization"] == {"bits": bits, "backend": "bitsandbytes", "quant_type": "nf4", "double_quant": True}
    reloaded, _ = load_tuned_model(None, run.adapter_dir)
    assert reloaded.quantization == Quantization(bits, "bitsandbytes")
    tokenizer, family, path = load_tokenizer(info["base_model"])
    in_memory = LoadedModel(run.model.eval(), tokenizer, family, path, info["base_model"])
    prompts = [s.prompt_messages for s in load_samples(small_data[1])[0][:3]]
    sampling = Sampling(max_new_tokens=5)
    assert Generator(in_memory, "auto").generate(prompts, sampling) == \
        Generator(reloaded, "auto").generate(prompts, sampling)


@needs_bitsandbytes
def test_a_qlora_adapter_also_loads_over_the_full_precision_base(tiny_model_dir, small_data, tmp_path, train_tiny):
    from glmtune.methods.adapter import load_tuned_model

    run = train_tiny(tiny_model_dir, small_data, tmp_path / "out", method="qlora", max_steps=2, dev_file=None)
    quantized, _ = load_tuned_model(None, run.adapter_dir)
    full, _ = load_tuned_model(None, run.adapter_dir, quantization=0)
    assert quantized.quantization_bit == 4 and full.quantization_bit == 0
    assert not any("lora_" in name for name, _ in full.model.named_parameters())  # merged into the full weights
    assert any("lora_" in name for name, _ in quantized.model.named_parameters())  # kept apart from 4-bit weights
