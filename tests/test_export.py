"""`glmtune export` (glmtune.export.run.export_model): a LoRA folded into its base (also over a 4-bit
bitsandbytes base and ChatGLM's own int4 layout), a LoRA adapter cast to another dtype, a P-Tuning prefix
as one file, and the errors raised before anything is written. The proof in each case: the export answers a
left-padded batch exactly as the base with the original adapter does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_lora_adapter, make_ptuning_adapter

from glmtune.errors import GlmtuneError
from glmtune.export.run import export_model

PROMPTS = ["Hi", "What is the capital of France? Answer in one word.", "你好",
           "Tell me a very short story about a cat, a hat and a rainy afternoon in the city."]


@torch.inference_mode()
def _answers(loaded, template="auto", tokens=10):
    """Greedy answers to PROMPTS as one left-padded batch (token ids: a tiny random model's text may decode
    to nothing), and the first step's logits."""
    from glmtune.config import GenerationOptions
    from glmtune.data.formats import Message
    from glmtune.inference.generate import Generator, generation_config

    generator = Generator(loaded, template)
    inputs = generator.inputs([[Message("user", p)] for p in PROMPTS])
    config = generation_config(GenerationOptions(max_new_tokens=tokens), loaded.tokenizer.pad_token_id, loaded.stop_ids)
    answers = loaded.model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1]:]
    assert answers.shape[1] > 1  # not stopped at once: the comparison means something
    return answers.tolist(), loaded.model(**inputs).logits[:, -1].float()


def _unmerged(adapter: Path):
    """The adapter's base (quantized as recorded) with the adapter applied but not merged."""
    from glmtune.export.run import _attach_lora, _load_base
    from glmtune.methods.adapter import read_adapter_info

    info = read_adapter_info(adapter)
    loaded = _load_base(info, adapter, None, "cpu")
    loaded.model = _attach_lora(loaded.model, adapter)
    return loaded


def _stored_keys(folder: Path) -> dict[str, torch.dtype]:
    from safetensors import safe_open

    found = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return found


def _checkpoint_keys(folder: Path) -> set[str]:
    from glmtune.export.merge import base_weight_sources

    return set(base_weight_sources(folder))


# ---------------------------------------------------------------- LoRA, merged

def test_merged_lora_answers_like_base_plus_adapter_and_loads_without_glmtune(tiny_model_dir, tmp_path):
    from glmtune.methods.adapter import load_tuned_model
    from glmtune.models.loader import load_model

    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter", template="plain")
    out = tmp_path / "merged"
    report = export_model(adapter, out, merge=True)
    assert (report.kind, report.dtype, report.output) == ("merged", "float32", out)
    assert report.check.startswith("greedy answers to 4 prompts identical; max |logit diff|")
    assert "model.safetensors" in report.files and "tokenizer.json" in report.files
    assert sorted(p.name for p in out.iterdir()) == report.files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    record = json.loads((out / "glmtune_export.json").read_text())
    assert {k: record[k] for k in ("format", "kind", "family", "method", "template", "dtype",
                                   "merged_from_quantization")} == \
        {"format": 1, "kind": "merged", "family": "generic", "method": "lora", "template": "plain",
         "dtype": "float32", "merged_from_quantization": None}
    assert record["base_model"] == str(tiny_model_dir) and record["check"] == report.check
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert not any("lora" in k for k in _stored_keys(out))

    # the proof: the merged checkpoint answers the left-padded batch as base + adapter (unmerged) do
    expected_answers, expected_logits = _answers(_unmerged(adapter), "plain")
    merged = load_model(str(out))
    assert merged.family == "generic"
    answers, logits = _answers(merged, "plain")
    assert answers == expected_answers
    assert torch.allclose(logits, expected_logits, atol=1e-4)
    base_answers, _ = _answers(load_model(str(tiny_model_dir)), "plain")
    assert base_answers != expected_answers  # the adapter matters, so the comparison means something

    # a merged export remembers its template for predict / chat / serve (info["template"], no method)
    _, info = load_tuned_model(str(out), None)
    assert info["template"] == "plain" and info["method"] is None

    # plain transformers, with glmtune made impossible to import, gives the same logits
    ids = merged.tokenizer(["Hello there, how are you?"], return_tensors="pt")["input_ids"]
    script = ("import sys; sys.modules['glmtune'] = None\n"
              "import torch\nfrom transformers import AutoModelForCausalLM\n"
              f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
              f"ids = torch.tensor({ids.tolist()})\n"
              "with torch.no_grad():\n"
              f"    torch.save(model(ids).logits, {str(tmp_path / 'logits.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        reference = _unmerged(adapter).model(ids).logits
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), reference, atol=1e-4)


def _official_like(source: Path, folder: Path) -> Path:
    """The tiny ChatGLM-6B folder as the official checkpoints lay it out: pytorch_model.bin holding also
    lm_head.weight and the rotary inv_freq buffers, a torch_dtype in config.json, the official .py code."""
    from safetensors.torch import load_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(source / "model.safetensors"))
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    state["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.float32)
    torch.save(state, folder / "pytorch_model.bin")
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_chatglm.py").write_text("# the official modeling code would be here\n")
    return folder


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_merged_native_chatglm_keeps_the_official_weight_names(family, tiny_family_dir, tmp_path):
    from glmtune.models.loader import load_model

    base = tiny_family_dir(family)
    if family == "chatglm":
        base = _official_like(base, tmp_path / "chatglm-6b")
    adapter = make_lora_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    report = export_model(adapter, out, merge=True)
    assert "identical" in report.check
    stored = _stored_keys(out)
    assert set(stored) == _checkpoint_keys(base)  # the same names: nothing lost, nothing added
    assert set(stored.values()) == {"F32"}
    if family == "chatglm":
        assert (out / "modeling_chatglm.py").is_file() and (out / "ice_text.model").is_file()
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(p.name for p in out.iterdir()) == report.files
    merged = load_model(str(out))
    assert merged.family == family
    expected_answers, expected_logits = _answers(_unmerged(adapter))
    answers, logits = _answers(merged)
    assert answers == expected_answers
    assert torch.allclose(logits, expected_logits, atol=1e-4)
    # the adapter matters (tiny ChatGLM-6B repeats <sop> whatever the weights, so logits tell)
    assert not torch.allclose(_answers(load_model(str(base)))[1], expected_logits, atol=1e-2)


def test_merged_export_casts_to_the_asked_dtype(tiny_family_dir, tmp_path):
    adapter = make_lora_adapter(tiny_family_dir("chatglm2"), tmp_path / "adapter")
    report = export_model(adapter, tmp_path / "merged", merge=True, dtype="bfloat16", check=False)
    assert report.check is None and report.dtype == "bfloat16"
    assert set(_stored_keys(tmp_path / "merged").values()) == {"BF16"}
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"


# ---------------------------------------------------------------- LoRA over a quantized base

def test_lora_over_a_4bit_bitsandbytes_base_merges_into_the_dequantized_weights(tiny_model_dir, tmp_path,
                                                                              bitsandbytes_cpu_path):
    """On both of bitsandbytes' CPU paths (see the fixture): the merge reads the NF4 weights the adapter was
    trained against, never bytes repacked for AVX-512 BF16."""
    from glmtune.models.kbit import Quantization, bitsandbytes_problem
    from glmtune.models.loader import load_model

    assert bitsandbytes_problem("cpu") is None
    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter", quantization=Quantization(4))
    out = tmp_path / "merged"
    report = export_model(adapter, out, merge=True)
    assert report.check.startswith("greedy answers to 4 prompts identical")  # 4-bit: the same maths, dequantized
    assert "4-bit nf4" in report.check
    record = json.loads((out / "glmtune_export.json").read_text())
    assert record["method"] == "qlora" and record["merged_from_quantization"]["bits"] == 4
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert set(_stored_keys(out).values()) == {"F32"}
    quantized = _unmerged(adapter)
    assert quantized.quantization.bits == 4
    merged = load_model(str(out))
    assert merged.quantization.bits == 0
    expected_answers, expected_logits = _answers(quantized)
    answers, logits = _answers(merged)
    assert answers == expected_answers
    assert torch.allclose(logits, expected_logits, atol=1e-4)


def test_lora_over_an_8bit_bitsandbytes_base_merges_and_the_check_states_the_difference(tiny_model_dir, tmp_path):
    """The one merge that is not lossless: bitsandbytes' 8-bit matmul rounds activations to int8 too, which the
    merged float model does not. The export finishes and its check line says what changed."""
    from glmtune.models.kbit import Quantization

    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter", quantization=Quantization(8))
    report = export_model(adapter, tmp_path / "merged", merge=True)
    assert "8-bit (bitsandbytes) base with the adapter vs the merged dequantized weights" in report.check
    assert "max |logit diff|" in report.check
    assert json.loads((tmp_path / "merged" / "glmtune_export.json").read_text())["merged_from_quantization"][
        "bits"] == 8


@pytest.mark.parametrize("quantization", [0, 4])
def test_a_merge_that_changes_the_answers_is_refused_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch,
                                                                        capsys, quantization):
    """A lossless merge (full weights, or 4-bit NF4) whose result answers differently is a bug: the export
    stops with one line and exit 2, and the earlier output stays as it was."""
    import glmtune.export.merge as merge
    from glmtune.cli import main
    from glmtune.models.kbit import Quantization

    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter", quantization=Quantization(quantization))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    fold = merge.fold_lora

    def wrong_fold(peft_model):  # as a merge that read the wrong base weights would
        plain = fold(peft_model)
        with torch.no_grad():
            for name, param in plain.named_parameters():
                if name.endswith("q_proj.weight"):
                    param.mul_(-3.0)
        return plain

    monkeypatch.setattr(merge, "fold_lora", wrong_fold)
    capsys.readouterr()
    assert main(["export", "--adapter", str(adapter), "--output", str(out), "--merge", "--overwrite"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("glmtune: error: the export was not written: its answers differ")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


def test_lora_over_a_stored_int4_chatglm_checkpoint_merges_to_full_weights(tiny_family_dir, tmp_path):
    """chatglm2-6b-int4 layout (quantization_bit 4 in config.json, int weights and fp16 scales): the merged
    checkpoint is a full-weight one with the same names less the scales."""
    from glmtune.models.loader import load_model

    source = tiny_family_dir("chatglm2")
    base = tmp_path / "chatglm2-6b-int4"
    shutil.copytree(source, base, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_model(str(source), quantization=4).model.state_dict(), base / "pytorch_model.bin")
    config = json.loads((base / "config.json").read_text())
    config["quantization_bit"] = 4
    (base / "config.json").write_text(json.dumps(config))
    adapter = make_lora_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    report = export_model(adapter, out, merge=True)
    assert "4-bit (chatglm)" in report.check and "identical" in report.check
    base_keys = _checkpoint_keys(base)
    assert any(k.endswith(".weight_scale") for k in base_keys)
    stored = _stored_keys(out)
    assert set(stored) == {k for k in base_keys if not k.endswith(".weight_scale")}
    assert set(stored.values()) == {"F32"}
    assert json.loads((out / "config.json").read_text())["quantization_bit"] == 0
    merged = load_model(str(out))
    assert (merged.family, merged.quantization.bits) == ("chatglm2", 0)
    expected_answers, expected_logits = _answers(_unmerged(adapter))
    answers, logits = _answers(merged)
    assert answers == expected_answers
    assert torch.allclose(logits, expected_logits, atol=1e-4)


# ---------------------------------------------------------------- LoRA, not merged

def test_an_unmerged_lora_export_is_a_clean_adapter_in_the_asked_dtype(tiny_model_dir, tmp_path):
    from glmtune.methods.adapter import load_tuned_model, read_adapter_info

    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter", template="plain")
    (adapter / "trainer_state.json").write_text("{}")  # stray files are not carried along
    out = tmp_path / "exported"
    report = export_model(adapter, out, dtype="float16")
    assert report.kind == "adapter" and report.files == ["adapter_config.json", "adapter_model.safetensors",
                                                         "glmtune_adapter.json", "glmtune_export.json"]
    assert "weights stored in float16" in report.check
    assert set(_stored_keys(out).values()) == {"F16"}
    assert read_adapter_info(out) == read_adapter_info(adapter)
    loaded, info = load_tuned_model(None, out)
    assert info["template"] == "plain"
    assert len(_answers(loaded, "plain")[0]) == len(PROMPTS)


# ---------------------------------------------------------------- P-Tuning v2

@pytest.mark.parametrize("family", ["generic", "chatglm2"])
def test_a_projected_prefix_exports_as_one_plain_table(family, tiny_family_dir, tmp_path):
    from safetensors.torch import load_file

    from glmtune.methods.adapter import load_tuned_model, read_adapter_info
    from glmtune.models.loader import load_model

    adapter = make_ptuning_adapter(tiny_family_dir(family), tmp_path / "adapter")
    assert any(".trans." in k for k in load_file(str(adapter / "prefix_encoder.safetensors")))
    out = tmp_path / "prefix"
    report = export_model(adapter, out)
    assert report.kind == "prefix" and report.check.startswith("greedy answers to 4 prompts identical")
    stored = load_file(str(out / "prefix_encoder.safetensors"))
    key = ("transformer." if family == "chatglm2" else "") + "prefix_encoder.embedding.weight"
    assert list(stored) == [key] and stored[key].dtype == torch.float32 and stored[key].shape[0] == 4
    info = read_adapter_info(out)
    assert info["parameters"] == {"pre_seq_len": 4, "prefix_projection": False, "prefix_hidden_size": None}
    assert info["family"] == family and info["base_model"] == str(tiny_family_dir(family))

    expected_answers, expected_logits = _answers(load_tuned_model(None, adapter)[0])
    answers, logits = _answers(load_tuned_model(None, out)[0])
    assert answers == expected_answers
    assert torch.allclose(logits, expected_logits, atol=1e-4)
    assert not torch.allclose(_answers(load_model(str(tiny_family_dir(family))))[1], expected_logits, atol=1e-2)

    half = export_model(adapter, tmp_path / "prefix16", dtype="float16", check=False)
    assert half.check is None
    assert load_file(str(tmp_path / "prefix16" / "prefix_encoder.safetensors"))[key].dtype == torch.float16


def test_an_official_chatglm2_ptuning_checkpoint_exports_with_its_base_named(tiny_family_dir, tmp_path):
    """ChatGLM2's ptuning/main.py writes pytorch_model.bin with transformer.prefix_encoder.* only."""
    from safetensors.torch import load_file

    from glmtune.methods.adapter import load_tuned_model, read_adapter_info

    base = tiny_family_dir("chatglm2")
    adapter = make_ptuning_adapter(base, tmp_path / "adapter", projection=False)
    official = tmp_path / "official"
    official.mkdir()
    torch.save(load_file(str(adapter / "prefix_encoder.safetensors")), official / "pytorch_model.bin")
    with pytest.raises(GlmtuneError, match="--model"):
        export_model(official, tmp_path / "out")
    report = export_model(official, tmp_path / "out", model=str(base))
    assert "identical" in report.check
    assert read_adapter_info(tmp_path / "out")["base_model"] == str(base)
    assert _answers(load_tuned_model(None, tmp_path / "out")[0])[0] == _answers(load_tuned_model(None, adapter)[0])[0]


# ---------------------------------------------------------------- errors, before anything is written

def test_user_errors_are_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    lora = make_lora_adapter(tiny_model_dir, tmp_path / "lora")
    prefix = make_ptuning_adapter(tiny_model_dir, tmp_path / "prefix", projection=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GlmtuneError, match="already exists.*--overwrite"):
        export_model(lora, out, merge=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(GlmtuneError, match="prefix is not a weight delta.*without --merge"):
        export_model(prefix, tmp_path / "new", merge=True)
    with pytest.raises(GlmtuneError, match="adapter folder not found"):
        export_model(tmp_path / "missing", tmp_path / "new")
    (tmp_path / "damaged").mkdir()
    with pytest.raises(GlmtuneError, match="glmtune_adapter.json is missing"):
        export_model(tmp_path / "damaged", tmp_path / "new")
    shutil.copytree(lora, tmp_path / "damaged", dirs_exist_ok=True)
    (tmp_path / "damaged" / "adapter_model.safetensors").unlink()
    with pytest.raises(GlmtuneError, match="damaged"):
        export_model(tmp_path / "damaged", tmp_path / "new", merge=True)
    with pytest.raises(GlmtuneError, match="dtype must be one of"):
        export_model(lora, tmp_path / "new", dtype="int8")
    with pytest.raises(GlmtuneError, match="would replace the adapter folder"):
        export_model(lora, lora, overwrite=True)
    with pytest.raises(GlmtuneError, match="would replace the base model folder"):
        export_model(lora, tiny_model_dir, merge=True, overwrite=True)
    other = tmp_path / "other-base"  # the same files, one layer fewer: the adapter does not fit
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(GlmtuneError, match="which does not match"):
        export_model(lora, tmp_path / "new", merge=True, model=str(other))
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "lora", "other-base", "out", "prefix"]


def test_a_failure_while_writing_leaves_the_old_output_untouched(tiny_model_dir, tmp_path, monkeypatch):
    import glmtune.export.merge as merge

    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def broken(model, folder, dtype):
        (folder / "model.safetensors").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(merge, "save_transformers", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(adapter, out, merge=True, overwrite=True, check=False)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]
    monkeypatch.undo()
    report = export_model(adapter, out, merge=True, overwrite=True, check=False)
    assert not (out / "old.txt").exists() and sorted(p.name for p in out.iterdir()) == report.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


def test_the_export_command_and_predict_with_what_it_wrote(tiny_model_dir, tmp_path, write_jsonl, capsys):
    """Through the CLI: a merged LoRA (trained with the plain template) answers `predict --model OUT` as the
    adapter answers `predict --adapter`, because the export remembers the template; an exported prefix is an
    adapter folder for predict; user errors exit 2 with one line."""
    from glmtune.cli import main

    lora = make_lora_adapter(tiny_model_dir, tmp_path / "lora", template="plain")
    prefix = make_ptuning_adapter(tiny_model_dir, tmp_path / "ptuning")
    rows = write_jsonl([{"prompt": p} for p in PROMPTS], "rows.jsonl")

    def predict(*options) -> list[str]:
        out = tmp_path / f"p{len(list(tmp_path.glob('p*.jsonl')))}.jsonl"
        assert main(["predict", *options, "--input", str(rows), "--output", str(out), "--max-new-tokens", "8"]) == 0
        return [json.loads(line)["prediction"] for line in out.read_text(encoding="utf-8").splitlines()]

    assert main(["export", "--adapter", str(lora), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    assert "check: greedy answers to 4 prompts identical" in capsys.readouterr().out
    assert predict("--model", str(tmp_path / "merged")) == predict("--adapter", str(lora))
    assert predict("--model", str(tmp_path / "merged"), "--template", "chat") != predict("--adapter", str(lora))

    assert main(["export", "--adapter", str(prefix), "--output", str(tmp_path / "prefix")]) == 0
    assert predict("--adapter", str(tmp_path / "prefix")) == predict("--adapter", str(prefix))

    capsys.readouterr()
    assert main(["export", "--adapter", str(prefix), "--output", str(tmp_path / "x"), "--merge"]) == 2
    assert main(["export", "--adapter", str(lora), "--output", str(tmp_path / "merged"), "--merge"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("glmtune: error: ") for e in errors)
    assert "cannot be merged" in errors[0] and "--overwrite" in errors[1]
    assert not (tmp_path / "x").exists()
