"""Adapters cross the border both ways: a LoRA folder written by plain peft (as the tutorials and
LLaMA-Factory save them, no glmtune_adapter.json) loads with --model BASE --adapter DIR, also when it was
saved over the official ChatGLM remote code, whose module names glmtune's native models keep; and a
glmtune adapter folder loads in plain peft. The proof is always logits or token ids, never text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError

# The official remote code's attention projection per family, and its output size from the config.
OFFICIAL_QKV = {"chatglm": "transformer.layers.{}.attention.query_key_value",
                "chatglm2": "transformer.encoder.layers.{}.self_attention.query_key_value"}


def _qkv_outputs(config: dict) -> int:
    if "inner_hidden_size" in config:  # ChatGLM-6B: full multi-head attention
        return 3 * config["hidden_size"]
    return config["hidden_size"] + 2 * config["kv_channels"] * config["multi_query_group_num"]


def _tutorial_config(r: int, targets, hint="THUDM/chatglm-6b", **extra) -> dict:
    """adapter_config.json as an old (peft 0.2/0.3) ChatGLM tutorial saved it, keys peft has since dropped included."""
    return {"base_model_name_or_path": hint, "bias": "none", "enable_lora": None, "fan_in_fan_out": False,
            "inference_mode": True, "lora_alpha": 32, "lora_dropout": 0.1, "merge_weights": False,
            "modules_to_save": None, "peft_type": "LORA", "r": r, "target_modules": targets,
            "task_type": "CAUSAL_LM", **extra}


@torch.inference_mode()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


def _ids(tokenizer):
    return tokenizer("你好，请介绍一下你自己。", return_tensors="pt")["input_ids"]


def _peft_save(base: Path, out: Path, targets: list[str], hint: str | None = None):
    """Plain peft over the base (glmtune's native classes stand in for the remote code), random B, saved
    with save_pretrained; returns the unmerged peft model."""
    from peft import LoraConfig, get_peft_model

    from glmtune.models.loader import load_model

    model = load_model(str(base)).model
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)
    peft_model.eval().save_pretrained(out)
    if hint:
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": hint}))
    return peft_model


@pytest.fixture
def no_weights_load(monkeypatch):
    """Any attempt to load model weights fails the test: the check must come before them."""
    import glmtune.models.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the adapter was refused")

    monkeypatch.setattr(loader, "load_model", refuse)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_peft_saved_over_native_chatglm_has_official_names_and_loads(family, tiny_family_dir, tmp_path):
    from glmtune.methods.adapter import load_tuned_model
    from glmtune.models.loader import read_model_config

    base = tiny_family_dir(family)
    layers = read_model_config(base)["num_layers"]
    reference = _peft_save(base, tmp_path / "lora", ["query_key_value"], hint=f"THUDM/{family}-6b")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    official = {f"base_model.model.{OFFICIAL_QKV[family].format(i)}.lora_{ab}.weight"
                for i in range(layers) for ab in "AB"}
    assert keys == official  # exactly the names peft writes over the official remote code

    loaded, info = load_tuned_model(str(base), tmp_path / "lora")
    ids = _ids(loaded.tokenizer)
    expected = _logits(reference, ids)
    got = _logits(loaded.model, ids)
    assert info["method"] == "lora" and info["family"] == family and info["parameters"]["rank"] == 4
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    with reference.disable_adapter():  # the adapter did something
        assert not torch.allclose(got, _logits(reference, ids), atol=1e-3)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_hand_written_remote_code_adapter_bin_matches_manual_merge(family, tiny_family_dir, tmp_path):
    """Keys written by name as peft writes them over the remote code (no glmtune involved in naming), in a
    .bin, with a tutorial's adapter_config.json; the reference adds scale * B @ A to the weights by hand."""
    from glmtune.methods.adapter import load_tuned_model
    from glmtune.models.loader import load_model, read_model_config

    base = tiny_family_dir(family)
    config = read_model_config(base)
    r, hidden, outputs = 4, config["hidden_size"], _qkv_outputs(config)
    torch.manual_seed(5)
    state = {}
    for i in range(config["num_layers"]):
        name = f"base_model.model.{OFFICIAL_QKV[family].format(i)}"
        state[f"{name}.lora_A.weight"] = torch.randn(r, hidden) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(outputs, r) * 0.1
    folder = tmp_path / "tutorial-lora"
    folder.mkdir()
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps(_tutorial_config(r, ["query_key_value"])))

    manual = load_model(str(base)).model.eval()
    modules = dict(manual.named_modules())
    with torch.no_grad():
        for i in range(config["num_layers"]):
            name = OFFICIAL_QKV[family].format(i)
            delta = state[f"base_model.model.{name}.lora_B.weight"] @ state[f"base_model.model.{name}.lora_A.weight"]
            modules[name].weight += (32 / r) * delta
    loaded, _ = load_tuned_model(str(base), folder)
    ids = _ids(loaded.tokenizer)
    expected, got = _logits(manual, ids), _logits(loaded.model, ids)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def _glmtune_lora(base: Path, out: Path) -> Path:
    """A LoRA adapter folder written as `glmtune train` writes it (the method's apply and save, then
    glmtune_adapter.json), with non-zero B so that it changes the logits."""
    from glmtune.methods.adapter import write_adapter_info
    from glmtune.methods.lora import LoraMethod
    from glmtune.models.loader import fingerprint, load_model

    loaded = load_model(str(base))
    options = TrainConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all-linear")
    method = LoraMethod()
    model = method.apply(loaded.model, options, loaded.family)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    out.mkdir(parents=True)
    method.save(model, out)
    write_adapter_info(out, method="lora", family=loaded.family, base_model=loaded.name,
                       fingerprint=fingerprint(loaded.model.config), template="auto",
                       parameters=method.parameters(options, loaded.family), extra={"quantization_bit": 0})
    return out


@pytest.mark.parametrize("family", ["generic", "chatglm"])
def test_glmtune_adapter_loads_in_plain_peft(family, tiny_family_dir, tmp_path):
    from peft import PeftModel

    from glmtune.methods.adapter import load_tuned_model
    from glmtune.models.loader import load_model

    base = tiny_family_dir(family)
    adapter = _glmtune_lora(base, tmp_path / "run" / "adapter")
    if family == "generic":  # what a peft user does: transformers for the base
        from transformers import AutoModelForCausalLM

        plain_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:  # native ChatGLM: the base as glmtune loads it (no remote code)
        plain_base = load_model(str(base)).model
    plain = PeftModel.from_pretrained(plain_base, str(adapter)).eval()
    loaded, _ = load_tuned_model(None, adapter)
    ids = _ids(loaded.tokenizer)
    expected, got = _logits(plain, ids), _logits(loaded.model, ids)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    with plain.disable_adapter():
        assert not torch.allclose(expected, _logits(plain, ids), atol=1e-3)


# ---------------------------------------------------------------- refused before any weights load

def _fake_lora(folder: Path, shapes: dict[str, tuple[int, int]], config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _refused(model, adapter) -> str:
    from glmtune.methods.adapter import load_tuned_model

    with pytest.raises(GlmtuneError) as caught:
        load_tuned_model(model, adapter)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_hub_id_is_only_a_hint_without_model(tmp_path, no_weights_load):
    qkv = "base_model.model.transformer.layers.0.attention.query_key_value"
    folder = _fake_lora(tmp_path / "lora", {f"{qkv}.lora_A.weight": (4, 64), f"{qkv}.lora_B.weight": (192, 4)},
                        _tutorial_config(4, ["query_key_value"]))
    message = _refused(None, folder)
    assert "'THUDM/chatglm-6b'" in message and "only a hint" in message and "--model" in message


def test_other_family_layer_names_are_refused(tiny_family_dir, tmp_path, no_weights_load):
    qkv = OFFICIAL_QKV["chatglm2"].format(0)
    folder = _fake_lora(tmp_path / "lora", {f"base_model.model.{qkv}.lora_A.weight": (4, 64),
                                            f"base_model.model.{qkv}.lora_B.weight": (128, 4)},
                        _tutorial_config(4, ["query_key_value"], hint="THUDM/chatglm2-6b"))
    message = _refused(str(tiny_family_dir("chatglm")), folder)
    assert "does not fit" in message and qkv in message and "another model family" in message
    # and a ChatGLM adapter over a Llama base
    message = _refused(str(tiny_family_dir("generic")), folder)
    assert "not in this model" in message


def test_other_size_is_refused(tiny_family_dir, tmp_path, no_weights_load):
    qkv = OFFICIAL_QKV["chatglm"].format(1)  # hidden size 4096 (ChatGLM-6B) over the 64-wide tiny model
    folder = _fake_lora(tmp_path / "lora", {f"base_model.model.{qkv}.lora_A.weight": (8, 4096),
                                            f"base_model.model.{qkv}.lora_B.weight": (12288, 8)},
                        _tutorial_config(8, ["query_key_value"]))
    message = _refused(str(tiny_family_dir("chatglm")), folder)
    assert f"{qkv} has 4096 inputs, the model's layer 64" in message and "another size" in message


def test_config_rank_that_the_weights_lack_is_refused(tiny_family_dir, tmp_path, no_weights_load):
    qkv = OFFICIAL_QKV["chatglm"].format(0)
    folder = _fake_lora(tmp_path / "lora", {f"base_model.model.{qkv}.lora_A.weight": (4, 64),
                                            f"base_model.model.{qkv}.lora_B.weight": (192, 4)},
                        _tutorial_config(8, ["query_key_value"]))
    assert "says r 8, but" in _refused(str(tiny_family_dir("chatglm")), folder)


def test_other_peft_types_and_damaged_folders_are_refused(tiny_family_dir, tmp_path, no_weights_load):
    base = str(tiny_family_dir("chatglm"))
    prefix = _fake_lora(tmp_path / "prefix", {"prompt_embeddings": (16, 64)},
                        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 16, "task_type": "CAUSAL_LM"})
    message = _refused(base, prefix)
    assert "peft PREFIX_TUNING folder" in message and "P-Tuning v2" in message
    ia3 = _fake_lora(tmp_path / "ia3", {"x.ia3_l": (1, 64)}, {"peft_type": "IA3", "task_type": "CAUSAL_LM"})
    assert "peft LoRA folders only" in _refused(base, ia3)
    old = _fake_lora(tmp_path / "merged-linear", {"base_model.model.x.lora_A.weight": (8, 64)},
                     _tutorial_config(4, ["query_key_value"], enable_lora=[True, False, True]))
    assert "old peft's merged-layer LoRA" in _refused(base, old)
    bare = _fake_lora(tmp_path / "bare-names", {f"{OFFICIAL_QKV['chatglm'].format(0)}.lora_A.weight": (4, 64)},
                      _tutorial_config(4, ["query_key_value"]))
    assert "no LoRA weights under peft's names" in _refused(base, bare)  # peft would silently load none of them
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps(_tutorial_config(4, ["query_key_value"])))
    assert "no adapter_model.safetensors or adapter_model.bin" in _refused(base, empty)


def test_compare_and_export_need_a_base_for_a_hub_hint(tmp_path, no_weights_load):
    from glmtune.evaluate.runs import EvalSettings, run_compare
    from glmtune.export.run import export_model

    qkv = "base_model.model.transformer.layers.0.attention.query_key_value"
    folder = _fake_lora(tmp_path / "lora", {f"{qkv}.lora_A.weight": (4, 64), f"{qkv}.lora_B.weight": (192, 4)},
                        _tutorial_config(4, ["query_key_value"]))
    data = tmp_path / "dev.jsonl"
    data.write_text('{"context": "你好", "target": "好"}\n', encoding="utf-8")
    with pytest.raises(GlmtuneError, match="only a hint"):
        run_compare(EvalSettings(data=str(data), output_dir=str(tmp_path / "cmp"), adapter=str(folder)))
    with pytest.raises(GlmtuneError, match="only a hint"):
        export_model(folder, tmp_path / "exported", merge=True)
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "exported").exists()


# ---------------------------------------------------------------- the commands

def test_export_merges_a_plain_peft_folder(tiny_family_dir, tmp_path):
    """export --merge and plain export: both run export's own check (identical greedy ids, or it raises)."""
    from glmtune.export.run import export_model
    from glmtune.methods.adapter import read_adapter_info

    base = tiny_family_dir("chatglm2")
    _peft_save(base, tmp_path / "lora", ["query_key_value", "dense_h_to_4h"], hint="THUDM/chatglm2-6b")
    merged = export_model(tmp_path / "lora", tmp_path / "merged", model=str(base), merge=True)
    assert merged.kind == "merged" and merged.check.startswith("greedy answers to 4 prompts identical")
    adapter = export_model(tmp_path / "lora", tmp_path / "exported", model=str(base), check=False)
    info = read_adapter_info(adapter.output)  # now a glmtune adapter folder that knows its base
    assert info["family"] == "chatglm2" and info["base_model"] == str(base.resolve())


def test_predict_cli_with_a_plain_peft_folder(tiny_family_dir, tmp_path, capsys):
    from glmtune.cli import main

    base = tiny_family_dir("generic")
    _peft_save(base, tmp_path / "lora", ["q_proj", "v_proj"], hint="HuggingFaceTB/SmolLM2-135M-Instruct")
    source = tmp_path / "in.jsonl"
    source.write_text('{"context": "你好", "id": 1}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["predict", "--adapter", str(tmp_path / "lora"), "--input", str(source), "--output", str(out),
            "--max-new-tokens", "4"]
    capsys.readouterr()
    assert main(args) == 2  # the hub id is not a folder here: one line, nothing written
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmtune: error:") and "--model" in err and "\n" not in err and not out.exists()
    assert main(["predict", "--model", str(base)] + args[1:]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [1] and isinstance(rows[0]["prediction"], str)
