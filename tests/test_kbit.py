"""Quantization options: which backend a family gets, what method qlora asks for, what an adapter records
and how a later command overrides it, and the errors where bitsandbytes cannot run."""

from __future__ import annotations

import importlib.util

import pytest

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.models.kbit import Quantization, is_repacked
from glmtune.train.recipe import requested_quantization

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
                                                             log_values, bitsandbytes_cpu_path):
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
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
    sampling = GenerationOptions(max_new_tokens=5)
    expected = Generator(in_memory, "auto").generate_ids(prompts, sampling)
    assert any(expected) and Generator(reloaded, "auto").generate_ids(prompts, sampling) == expected
    if bits == 4:  # 4-bit layers kept the standard layout through training, evaluation and generation
        layers = _linear4bit_layers(in_memory.model) + _linear4bit_layers(reloaded.model)
        assert layers and not any(is_repacked(layer) for layer in layers)


def _linear4bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@needs_bitsandbytes
def test_a_qlora_adapter_also_loads_over_the_full_precision_base(tiny_model_dir, small_data, tmp_path, train_tiny):
    from glmtune.methods.adapter import load_tuned_model

    run = train_tiny(tiny_model_dir, small_data, tmp_path / "out", method="qlora", max_steps=2, dev_file=None)
    quantized, _ = load_tuned_model(None, run.adapter_dir)
    full, _ = load_tuned_model(None, run.adapter_dir, quantization=0)
    assert quantized.quantization_bit == 4 and full.quantization_bit == 0
    assert not any("lora_" in name for name, _ in full.model.named_parameters())  # merged into the full weights
    assert any("lora_" in name for name, _ in quantized.model.named_parameters())  # kept apart from 4-bit weights


# ---------------------------------------------------------------- bitsandbytes' CPU layouts

def _bare_4bit_layer():
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 64) * 0.1, requires_grad=False, quant_type="nf4")
    return layer.to("cpu").eval()


def _dequantized(layer):
    import bitsandbytes.functional as F

    return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def test_the_forced_avx512_bf16_path_is_the_one_that_repacks(bitsandbytes_cpu_path):
    """Proof that the fixture reaches bitsandbytes' branch on any CPU: left alone, a 4-bit layer repacks its
    weight in place at its first eval forward on the AVX-512 BF16 path, and reads differently as NF4 after."""
    import torch

    layer = _bare_4bit_layer()
    before = _dequantized(layer).clone()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert is_repacked(layer) == (bitsandbytes_cpu_path == "avx512_bf16")
    assert torch.equal(_dequantized(layer), before) == (bitsandbytes_cpu_path == "standard")


def test_keep_standard_layout_stops_repacking_and_unpacks_a_repacked_layer(bitsandbytes_cpu_path):
    import torch

    from glmtune.models.kbit import keep_standard_layout

    kept, repacked = _bare_4bit_layer(), _bare_4bit_layer()
    before = _dequantized(kept).clone()
    x = torch.randn(3, 64)
    with torch.no_grad():
        repacked(x)  # repacked on the AVX-512 BF16 path
        assert keep_standard_layout(kept) == 1 and keep_standard_layout(repacked) == 1
        out = kept(x)
        assert not is_repacked(kept) and not is_repacked(repacked)
        assert torch.equal(_dequantized(kept), before)  # the same bytes, read as NF4
        assert torch.allclose(out, x @ before.T + kept.bias, atol=1e-5)  # computed with exactly those weights
        # bitsandbytes' own inverse gives back NF4 up to the bf16 rounding of the scales its repacking did
        assert torch.allclose(_dequantized(repacked), before, rtol=1e-2, atol=1e-3)


@needs_bitsandbytes
def test_a_4bit_base_computes_with_its_nf4_weights_on_both_cpu_paths(tiny_model_dir, bitsandbytes_cpu_path):
    """A model glmtune loads in 4 bits keeps every layer in the standard layout through eval forwards, and its
    logits are those of its dequantized weights in a plain float model."""
    import torch

    from glmtune.models.kbit import dequantize_bitsandbytes
    from glmtune.models.loader import load_model

    loaded = load_model(str(tiny_model_dir), quantization=Quantization(4))
    model = loaded.model.eval()
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        second = model(input_ids=ids).logits
        layers = _linear4bit_layers(model)
        assert layers and not any(is_repacked(layer) for layer in layers)
        assert dequantize_bitsandbytes(model) == len(layers)
        plain = model(input_ids=ids).logits
    assert torch.equal(logits, second)
    assert torch.allclose(logits, plain, atol=1e-4)


# A subprocess that makes bitsandbytes' import believe the CPU has AVX-512 BF16 (what it checks before it
# registers its AVX-512 kernels and tries the optional `kernels` package, logging a warning when that fails).
FORCE_AVX512_BF16_AT_IMPORT = """
import importlib.abc, importlib.machinery, sys

class ForceAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.backends.cpu.ops":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            import bitsandbytes.functional
            bitsandbytes.functional.has_avx512bf16 = lambda: True
            run(module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, ForceAvx512Bf16())
"""
KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward"


def _python(code: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", FORCE_AVX512_BF16_AT_IMPORT + code], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ))


@needs_bitsandbytes
def test_bitsandbytes_import_messages_go_to_the_debug_log():
    plain = _python("import bitsandbytes")
    assert KERNELS_WARNING in plain.stderr  # the control: the import does print it on such a CPU
    # the terminal (stderr) shows INFO and up, as `glmtune` without -v; stdout gets the debug log, as with -v
    quiet = _python("import logging, sys\n"
                    "terminal = logging.StreamHandler(sys.stderr)\n"
                    "terminal.setLevel(logging.INFO)\n"
                    "logging.basicConfig(level=logging.DEBUG, handlers=[terminal, logging.StreamHandler(sys.stdout)])\n"
                    "from glmtune.models.kbit import import_bitsandbytes\n"
                    "print('imported', import_bitsandbytes().__name__)\n")
    assert quiet.returncode == 0, quiet.stderr
    assert KERNELS_WARNING not in quiet.stderr and "imported bitsandbytes" in quiet.stdout
    assert "bitsandbytes (while importing): " + KERNELS_WARNING in quiet.stdout  # kept for -v


@needs_bitsandbytes
def test_glmtune_imports_bitsandbytes_only_for_a_quantized_base_and_quietly(tiny_model_dir, small_data, tmp_path):
    """`glmtune train` with LoRA never imports bitsandbytes (peft would, as a side effect); then QLoRA in the
    same process imports it, quietly, and trains over a 4-bit base."""
    code = f"""
from glmtune.cli import main
common = ["model={tiny_model_dir}", "train_file={small_data[0]}", "max_steps=1", "batch_size=2",
          "dataset_cache=false"]
assert main(["train", *common, "output_dir={tmp_path / 'lora'}"]) == 0
print("after lora:", sys.modules.get("bitsandbytes") is not None, "peft" in sys.modules)
assert main(["train", *common, "output_dir={tmp_path / 'qlora'}", "method=qlora"]) == 0
print("after qlora:", sys.modules.get("bitsandbytes") is not None)
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "after lora: False True" in result.stdout  # peft was imported, bitsandbytes was not
    assert "after qlora: True" in result.stdout
    assert KERNELS_WARNING not in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "qlora" / "adapter" / "adapter_model.safetensors").is_file()
