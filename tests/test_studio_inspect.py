"""The studio's inspection of a model (glmtune.studio.inspect_model) and of a data file
(glmtune.studio.inspect_data): facts checked against what the loader, the trainer's encoder and
`glmtune data stats --json` give. The ChatGLM checks use the official config.json and tokenizer files of
../shared/fixtures/tokenizers, in a folder without weights (the model is built on the meta device)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from glmtune.config import DEFAULT_MODEL
from glmtune.data.preprocess import IGNORE_INDEX, LengthLimits
from glmtune.errors import GlmtuneError
from glmtune.studio.inspect_data import inspect_data, preview_html
from glmtune.studio.inspect_model import describe_model, method_fit

SAMPLE_TRAIN = Path(__file__).resolve().parent.parent / "glmtune" / "sample_data" / "train.jsonl"


# ------------------------------------------------------------------------------------------------- models

def _official_folder(tmp_path: Path, family: str) -> Path:
    """A checkpoint folder without weights: the official config.json and the real tokenizer files."""
    from glmtune.paths import shared_dir

    source = shared_dir() / "fixtures" / "tokenizers" / ("chatglm-6b" if family == "chatglm" else "chatglm2-6b")
    vocabulary = "ice_text.model" if family == "chatglm" else "tokenizer.model"
    if not (source / vocabulary).is_file():
        pytest.skip(f"ChatGLM tokenizer fixture not found under {source} (set GLMTUNE_SHARED)")
    folder = tmp_path / f"{family}-6b"
    folder.mkdir()
    if family == "chatglm":
        shutil.copy(source / "official_config.json", folder / "config.json")
        shutil.copy(source / "tokenizer_config.json", folder)
    else:
        shutil.copy(source / f"official_config.{family}.json", folder / "config.json")
        shutil.copy(source / f"tokenizer_config.{family}.json", folder / "tokenizer_config.json")
    shutil.copy(source / vocabulary, folder)
    return folder


def _expected_parameters(c: dict) -> int:
    """The base model's parameters from config.json's shapes alone (not from the model code)."""
    h, layers = c["hidden_size"], c["num_layers"]
    if "inner_hidden_size" in c:  # ChatGLM-6B: biased linear layers, LayerNorms with bias, lm_head tied
        ffn = c["inner_hidden_size"]
        layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h
        return layers * layer + c["vocab_size"] * h + 2 * h
    ffn, kv = c["ffn_hidden_size"], 2 * c["kv_channels"] * c["multi_query_group_num"]  # ChatGLM2/3
    layer = (h * (h + kv) + (h + kv)) + h * h + h * 2 * ffn + ffn * h + 2 * h
    return layers * layer + 2 * c["padded_vocab_size"] * h + h


def _check_estimates(facts) -> None:
    assert facts.fits and facts.memory_available_gib > 0 and facts.device in ("cpu", "cuda")
    for fit in facts.fits:
        assert fit.estimated_gib is not None and fit.estimated_gib > 0, fit
        assert fit.fits is not None and fit.trainable and fit.layers, fit
        assert fit.problem in (None, "over_budget", "unavailable"), fit
        assert fit.fits == (fit.problem is None)


def test_default_model_facts(default_model_dir):
    """Family, size (the loaded model's own count), context, template and an estimate per method."""
    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_model, load_tokenizer, read_model_config

    facts = describe_model(DEFAULT_MODEL)
    assert facts.family == "generic" and facts.path == default_model_dir and facts.stored_quantization is None
    loaded = load_model(DEFAULT_MODEL)
    assert facts.parameters == sum(p.numel() for p in loaded.model.parameters())  # tied embeddings once
    assert facts.context_length == read_model_config(default_model_dir)["max_position_embeddings"]
    tokenizer, family, _ = load_tokenizer(DEFAULT_MODEL)
    assert facts.template == get_template("auto", tokenizer, family).name == "chat"
    assert facts.assumed["batch_size"] == 4 and facts.assumed["seq_len"] == 1024
    assert [(f.method, f.quantization_bit, f.backend) for f in facts.fits] == [
        ("lora", 0, None), ("qlora", 8, "bitsandbytes"), ("qlora", 4, "bitsandbytes"), ("ptuning", 0, None)]
    _check_estimates(facts)
    assert method_fit(facts, "lora", 4, "chatglm") is None  # ChatGLM's own int4 is for ChatGLM only
    lora, ptuning = method_fit(facts, "lora"), method_fit(facts, "ptuning")
    assert ptuning.trainable < lora.trainable


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_full_size_chatglm_facts(tmp_path, family):
    """The official 6B configs: family, about 6.2B parameters counted from the config's shapes, the context
    and layout, and LoRA / P-Tuning over ChatGLM's own int8/int4 offered, smaller than over full weights."""
    folder = _official_folder(tmp_path, family)
    config = json.loads((folder / "config.json").read_text())
    facts = describe_model(str(folder))
    assert facts.family == family and facts.template == family and facts.stored_quantization is None
    assert facts.parameters == _expected_parameters(config)
    assert 6.1e9 < facts.parameters < 6.3e9
    assert facts.context_length == config.get("seq_length", config.get("max_sequence_length"))
    _check_estimates(facts)
    full, int4 = method_fit(facts, "lora"), method_fit(facts, "lora", 4, "chatglm")
    assert int4 is not None and method_fit(facts, "lora", 8, "chatglm") is not None
    assert method_fit(facts, "ptuning", 4, "chatglm") is not None
    assert int4.estimated_gib < full.estimated_gib and int4.trainable == full.trainable


def test_stored_int4_checkpoint_offers_only_methods_over_it(tmp_path):
    """A chatglm2-6b-int4-like config (quantization_bit 4): read as it is stored; its size counts the
    unpacked weights."""
    folder = _official_folder(tmp_path, "chatglm2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    facts = describe_model(str(folder))
    assert facts.stored_quantization == "int4" and facts.parameters == _expected_parameters(config)
    assert [(f.method, f.quantization_bit, f.backend) for f in facts.fits] == [("lora", 4, "chatglm"),
                                                                              ("ptuning", 4, "chatglm")]
    _check_estimates(facts)


def test_not_a_model_is_one_line_error(tmp_path):
    with pytest.raises(GlmtuneError) as missing:
        describe_model(str(tmp_path / "nowhere"))
    assert "model not found" in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(GlmtuneError, match="not a checkpoint folder") as empty:
        describe_model(str(tmp_path))
    assert "\n" not in str(empty.value)


# --------------------------------------------------------------------------------------------------- data

def _training_encoder(model: str, train_on: str = "all_assistant"):
    """The encoder training builds for `model` (its template, stop tokens and train_on)."""
    from glmtune.data.preprocess import Encoder
    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_tokenizer
    from glmtune.train.dry_run import training_stop_ids

    tokenizer, family, path = load_tokenizer(model)
    return Encoder(tokenizer, get_template("auto", tokenizer, family), training_stop_ids(tokenizer, family, path),
                   train_on=train_on)


def _texts(row, trained: bool) -> str:
    return "".join(s.text for s in row.segments if s.trained == trained)


def test_sample_data_facts_match_validate_stats_and_the_encoder(default_model_dir, capsys):
    from glmtune.cli import main
    from glmtune.data.formats import load_samples

    facts = inspect_data(SAMPLE_TRAIN, DEFAULT_MODEL)
    samples, fmt = load_samples(SAMPLE_TRAIN)
    assert (facts.format, facts.samples, facts.trained_answers, facts.tool_calls) == (fmt.name, len(samples),
                                                                                      len(samples), 0)
    assert facts.limits == LengthLimits(cutoff_len=1024) and facts.template == "chat"  # training's defaults
    assert main(["data", "stats", str(SAMPLE_TRAIN), "--json", "--cutoff-len", "1024"]) == 0
    assert facts.stats == json.loads(capsys.readouterr().out)
    assert facts.samples_cut == facts.stats["cut_at"]["cutoff_len=1024"] == 0

    encoder = _training_encoder(DEFAULT_MODEL)
    tokenizer = encoder.tokenizer
    assert [row.line for row in facts.preview] == [1, 2, 3]
    for row, sample in zip(facts.preview, samples):
        feature, _ = encoder.encode(sample, facts.limits)
        labelled = [t for t, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE_INDEX]
        # the labelled ids are the answer's as the encoder encodes its answer segment (eos included) ...
        answer = encoder.template.render(sample.messages)[-1]
        assert answer.answer and labelled == encoder.encode_segment(answer, split=False).ids()
        # ... and exactly those are marked trained
        assert _texts(row, True) == tokenizer.decode(labelled, skip_special_tokens=False)
        assert _texts(row, False) + _texts(row, True) == tokenizer.decode(feature["input_ids"],
                                                                          skip_special_tokens=False)
        assert sample.reference in _texts(row, True) and sample.reference not in _texts(row, False)
        assert sample.messages[0].content.strip() in _texts(row, False) and not row.cut


def test_last_assistant_marks_only_the_last_answer(write_jsonl, default_model_dir):
    path = write_jsonl([{"messages": [{"role": "user", "content": "first question"},
                                      {"role": "assistant", "content": "ANSWER-ONE-alpha"},
                                      {"role": "user", "content": "second question"},
                                      {"role": "assistant", "content": "ANSWER-TWO-beta"}]}])
    every = inspect_data(path, DEFAULT_MODEL)
    assert every.trained_answers == 2 and every.format == "messages"
    assert "ANSWER-ONE-alpha" in _texts(every.preview[0], True) and "ANSWER-TWO-beta" in _texts(every.preview[0], True)

    last = inspect_data(path, DEFAULT_MODEL, train_on="last_assistant")
    assert last.trained_answers == 1 and len(last.preview) == 1
    row = last.preview[0]
    assert "ANSWER-TWO-beta" in _texts(row, True) and "ANSWER-ONE-alpha" not in _texts(row, True)
    assert "ANSWER-ONE-alpha" in _texts(row, False)
    assert [s.trained for s in row.segments] == [False, True]  # the prompt (first answer inside), then the answer


def test_limits_mark_cut_rows(write_jsonl, default_model_dir):
    path = write_jsonl([{"prompt": "short", "response": "ok"}, {"prompt": "long " * 200, "response": "ok"}])
    facts = inspect_data(path, DEFAULT_MODEL, limits=LengthLimits(cutoff_len=64))
    assert [row.cut for row in facts.preview] == [False, True]
    assert facts.samples_cut == facts.stats["cut_at"]["cutoff_len=64"] == 1


def test_preview_html_escapes_user_text(write_jsonl, default_model_dir):
    path = write_jsonl([{"context": "hi <script>alert(1)</script>\nsecond line",
                         "target": "<img src=x onerror=alert(2)> & done"}])
    facts = inspect_data(path, DEFAULT_MODEL)
    page = preview_html(facts.preview)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt; &amp; done" in page
    assert set(re.findall(r"</?([a-zA-Z]+)", page)) == {"div", "mark"}  # only the preview's own markup
    assert "white-space: pre-wrap" in page and "alert(1)&lt;/script&gt;\nsecond line" in page
    assert re.search(r'<mark class="trained">&lt;img', page) and '<div class="line">line 1</div>' in page


def test_broken_jsonl_raises_load_samples_error_unchanged(write_jsonl, tmp_path):
    from glmtune.data.formats import load_samples

    path = write_jsonl([{"context": "a", "target": "b"}, {"context": "c", "target": "d"}, '{"context": "e", ',
                        {"context": "f", "target": "g"}])
    with pytest.raises(GlmtuneError) as raised:  # the data is read before any model: even a missing one
        inspect_data(path, str(tmp_path / "no-model"))
    assert str(raised.value).startswith(f"{path}:3: ")
    with pytest.raises(GlmtuneError) as direct:
        load_samples(path)
    assert str(raised.value) == str(direct.value)


def test_over_budget_estimate_is_what_auto_checkpointing_plans(monkeypatch, default_model_dir):
    """Below every estimate, gradient checkpointing auto recomputes every layer and is still over: the facts
    say so with plan_recompute's own estimate (describe_model takes a shortcut to it)."""
    import torch

    from glmtune.config import TrainConfig
    from glmtune.methods import get_method
    from glmtune.train import recompute
    from glmtune.train.dry_run import empty_model

    monkeypatch.setattr(recompute, "default_budget_gib", lambda device: (0.05, "test"))
    facts = describe_model(DEFAULT_MODEL)
    assert facts.memory_available_gib == 0.05
    assert all(f.problem == "over_budget" and f.recomputed_layers == f.layers for f in facts.fits)
    dtype = getattr(torch, facts.assumed["dtype"])
    model = get_method("lora").apply(empty_model(default_model_dir, "generic", dtype), TrainConfig(), "generic")
    S = facts.assumed["seq_len"]
    plan = recompute.plan_recompute(model, requested=None, budget_gib=0.05, device="cpu",
                                    features=[{"input_ids": [0] * S, "labels": [0] * S}] * 4, batch_size=4,
                                    one_row=True, dtype=dtype, weights_dtype=dtype, optim=facts.assumed["optim"])
    lora = method_fit(facts, "lora")
    assert plan.recomputed == lora.recomputed_layers and plan.estimate_bytes == round(lora.estimated_gib * 2**30)
