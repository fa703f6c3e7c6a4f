"""The tutorial recipes in examples/ and `glmtune train --dry-run`.

Every example is dry-run against the official config.json and tokenizer files of its model (from
../shared/fixtures/tokenizers; GLM-4's published config with a stand-in tokenizer), with model and data
rewritten by key=value overrides. The trainable and total parameter counts are worked out here from the
config alone, independently of the model code that the dry run builds on the meta device.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from glmtune.bench.gpu.shapes import GLM4_9B_CONFIG  # glm-4-9b-chat-hf's config.json
from glmtune.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

def shared_tokenizers(name: str) -> Path:
    from glmtune.paths import shared_dir

    folder = shared_dir() / "fixtures" / "tokenizers" / name
    if not (folder / "tokenizer_config.json").is_file() and not any(folder.glob("tokenizer_config.*.json")):
        pytest.skip(f"{name} tokenizer fixture not found under {folder} (set GLMTUNE_SHARED)")
    return folder


def model_folder(tmp_path: Path, family: str, tiny_family_dir=None) -> Path:
    """A checkpoint folder without weights: the official config.json and the real tokenizer files."""
    folder = tmp_path / f"{family}-model"
    folder.mkdir()
    if family == "chatglm":
        source = shared_tokenizers("chatglm-6b")
        shutil.copy(source / "official_config.json", folder / "config.json")
        for name in ("ice_text.model", "tokenizer_config.json"):
            shutil.copy(source / name, folder)
    elif family in ("chatglm2", "chatglm3"):
        source = shared_tokenizers("chatglm2-6b")
        shutil.copy(source / f"official_config.{family}.json", folder / "config.json")
        shutil.copy(source / "tokenizer.model", folder)
        shutil.copy(source / f"tokenizer_config.{family}.json", folder / "tokenizer_config.json")
    else:  # GLM-4: its published config, and the tiny GLM-4 stand-in's tokenizer (the real one is not in shared/)
        tiny = tiny_family_dir("glm4")
        for file in tiny.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
                shutil.copy(file, folder)
        (folder / "config.json").write_text(json.dumps(GLM4_9B_CONFIG))
    return folder


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


SHORT_PROMPT = "类型#裙*颜色#红色"
LONG_PROMPT = "类型#裙*版型#显瘦*材质#网纱*风格#性感*图案#刺绣*裙型#百褶*裙长#连衣裙*" * 14
SHORT_ANSWER = "这款红色连衣裙简洁大方。"
LONG_ANSWER = "这款连衣裙采用轻盈的网纱面料，穿起来非常透气舒适，百褶的裙摆随着步伐摇曳，显得格外灵动。" * 8
# (prompt, answer) rows: the long prompt is 449 ChatGLM-6B tokens (477 ChatGLM2/3), the long answer 200 (233):
# at 64/64 three of the four rows are cut, at 400/300 the two long prompts
PAIRS = [(SHORT_PROMPT, SHORT_ANSWER), (LONG_PROMPT, SHORT_ANSWER), (SHORT_PROMPT, LONG_ANSWER),
         (LONG_PROMPT, LONG_ANSWER)]


def adgen_rows():
    return [{"content": p, "summary": a} for p, a in PAIRS]


def context_rows():
    return [{"context": p, "target": a} for p, a in PAIRS]


def conversation_rows(key: str):
    return [{key: [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in PAIRS]


# Parameter counts from the config alone -------------------------------------------------------------------

def chatglm6b_total(c: dict) -> int:
    h, ffn, layers = c["hidden_size"], c["inner_hidden_size"], c["num_layers"]
    layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h  # LayerNorms have bias
    heads = 1 if c.get("tie_word_embeddings", True) else 2  # ChatGLM-6B's lm_head is its embedding matrix
    return layers * layer + heads * c["vocab_size"] * h + 2 * h  # and the final LayerNorm


def chatglm2_total(c: dict) -> int:
    h, ffn, layers = c["hidden_size"], c["ffn_hidden_size"], c["num_layers"]
    kv = 2 * c["kv_channels"] * c["multi_query_group_num"]
    layer = (h * (h + kv) + (h + kv)) + h * h + h * 2 * ffn + ffn * h + 2 * h  # RMSNorm: weight only
    return layers * layer + 2 * c["padded_vocab_size"] * h + h


def glm4_total(c: dict) -> int:
    h, ffn, layers, d = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    layer = (h * q + q) + 2 * (h * kv + kv) + q * h + h * 2 * ffn + ffn * h + 2 * h
    return layers * layer + 2 * c["vocab_size"] * h + h


def lora_count(rank: int, layers: int, shapes: list[tuple[int, int]]) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted linear layer."""
    return layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)


def official(family: str) -> dict:
    if family == "glm4":
        return GLM4_9B_CONFIG
    if family == "chatglm":
        return json.loads((shared_tokenizers("chatglm-6b") / "official_config.json").read_text())
    return json.loads((shared_tokenizers("chatglm2-6b") / f"official_config.{family}.json").read_text())


def expected_counts(example: str) -> tuple[int, int]:
    """(trainable, total) for an example's method on its model's official config."""
    if example == "chatglm6b_adgen_ptuning.yaml":  # P-Tuning v2 without projection: one key and value per layer
        c = official("chatglm")
        trainable = 128 * c["num_layers"] * 2 * c["hidden_size"]
        return trainable, chatglm6b_total(c) + trainable
    if example == "chatglm6b_lora_multitask.yaml":  # r 8 on query_key_value (h -> 3h)
        c = official("chatglm")
        h = c["hidden_size"]
        trainable = lora_count(8, c["num_layers"], [(h, 3 * h)])
        return trainable, chatglm6b_total(c) + trainable
    if example == "chatglm2_ptuning.yaml":  # multi-query: keys and values are 2 groups x 128 wide
        c = official("chatglm2")
        trainable = 128 * c["num_layers"] * 2 * c["kv_channels"] * c["multi_query_group_num"]
        return trainable, chatglm2_total(c) + trainable
    if example == "chatglm3_lora.yaml":
        c = official("chatglm3")
        h = c["hidden_size"]
        trainable = lora_count(8, c["num_layers"], [(h, h + 2 * c["kv_channels"] * c["multi_query_group_num"])])
        return trainable, chatglm2_total(c) + trainable
    if example == "glm4_lora.yaml":  # q_proj, k_proj, v_proj
        c = official("glm4")
        h, d = c["hidden_size"], c["head_dim"]
        shapes = [(h, c["num_attention_heads"] * d)] + 2 * [(h, c["num_key_value_heads"] * d)]
        trainable = lora_count(8, c["num_hidden_layers"], shapes)
        return trainable, glm4_total(c) + trainable
    raise KeyError(example)


# The examples ---------------------------------------------------------------------------------------------

RECIPES = {
    # example: (family, data rows, the options the tutorial run sets, cut counts (samples, prompts, answers))
    "chatglm6b_adgen_ptuning.yaml": ("chatglm", adgen_rows, {
        "method": "ptuning", "pre_seq_len": 128, "learning_rate": 0.02, "quantization_bit": 4,
        "quantization_backend": "chatglm", "max_source_length": 64, "max_target_length": 64, "batch_size": 1,
        "gradient_accumulation_steps": 16, "max_steps": 3000, "prompt_column": "content",
        "response_column": "summary", "logging_steps": 10, "save_steps": 1000, "template": "chatglm"}, (3, 2, 2)),
    "chatglm6b_lora_multitask.yaml": ("chatglm", context_rows, {
        "method": "lora", "lora_rank": 8, "lora_alpha": 32.0, "lora_dropout": 0.1, "lora_target": "query_key_value",
        "learning_rate": 3e-05, "batch_size": 1, "num_train_epochs": 2.0, "max_source_length": 400,
        "max_target_length": 300, "save_steps": 1000, "logging_steps": 100, "lr_scheduler": "linear",
        "warmup_ratio": 0.06, "quantization_bit": 0}, (2, 2, 0)),
    "chatglm2_ptuning.yaml": ("chatglm2", adgen_rows, {
        "method": "ptuning", "pre_seq_len": 128, "learning_rate": 0.02, "quantization_bit": 4,
        "max_source_length": 64, "max_target_length": 128, "batch_size": 1, "gradient_accumulation_steps": 16,
        "max_steps": 3000, "save_steps": 1000, "template": "chatglm2"}, (3, 2, 2)),
    "chatglm3_lora.yaml": ("chatglm3", lambda: conversation_rows("conversations"), {
        "method": "lora", "lora_rank": 8, "lora_alpha": 32.0, "lora_dropout": 0.1, "lora_target": "query_key_value",
        "learning_rate": 5e-05, "batch_size": 4, "max_steps": 3000, "save_steps": 500, "eval_steps": 500,
        "cutoff_len": 769, "template": "chatglm3"}, (0, 0, 0)),
    "glm4_lora.yaml": ("glm4", lambda: conversation_rows("messages"), {
        "method": "lora", "lora_rank": 8, "lora_alpha": 32.0, "lora_dropout": 0.1,
        "lora_target": "q_proj,k_proj,v_proj", "learning_rate": 5e-04, "batch_size": 1, "max_steps": 3000,
        "save_steps": 500, "cutoff_len": 1025, "template": "glm4"}, (2, 2, 1)),
}


def test_every_recipe_is_tested():
    assert sorted(RECIPES) == sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name.startswith(("chatglm", "glm4")))


def resolved_yaml(output: str) -> dict:
    import yaml

    text = output.split("# dry run:")[0]
    return yaml.safe_load(text)


def assert_file_values_kept(path: Path, resolved: dict, replaced=("model", "train_file", "dev_file")) -> None:
    """Every option the example sets is in the resolved options as written (the files the test replaces,
    and LoRA targets that are worked out, aside)."""
    from glmtune.config import read_config_file

    for key, value in read_config_file(path).items():
        if key in replaced or (key == "lora_target" and value in ("auto", "all-linear")):
            continue
        assert resolved[key] == value, (path.name, key, resolved[key], value)


def number(output: str, pattern: str) -> tuple[int, ...]:
    match = re.search(pattern, output)
    assert match, f"{pattern!r} not in:\n{output}"
    return tuple(int(g.replace(",", "")) for g in match.groups())


@pytest.mark.parametrize("example", sorted(RECIPES))
def test_dry_run_of_each_recipe(example, tmp_path, monkeypatch, capsys, request):
    family, rows, settings, (cut, prompts_cut, answers_cut) = RECIPES[example]
    # the tiny GLM-4 (for its tokenizer) is built only where needed
    model = model_folder(tmp_path, family, request.getfixturevalue("tiny_family_dir") if family == "glm4" else None)
    train = write_rows(tmp_path / "train.jsonl", rows())
    dev = write_rows(tmp_path / "dev.jsonl", rows()[:2])
    monkeypatch.chdir(tmp_path)  # the example's relative output_dir would land here
    before = sorted(p.name for p in tmp_path.iterdir())

    code = main(["train", str(EXAMPLES / example), f"model={model}", f"train_file={train}", f"dev_file={dev}",
                 "--dry-run"])
    output = capsys.readouterr().out
    assert code == 0, output

    resolved = resolved_yaml(output)
    for key, value in settings.items():
        assert resolved[key] == value, (key, resolved[key], value)
    assert_file_values_kept(EXAMPLES / example, resolved)
    assert resolved["model"] == str(model) and resolved["train_file"] == str(train)
    trainable, total = expected_counts(example)
    assert number(output, r"trainable parameters: ([\d,]+) of ([\d,]+)") == (trainable, total)
    assert f"family {family};" in output and "no weight files yet" in output
    samples, samples_cut, prompts, answers = number(
        output, r"train data: (\d+) samples, [\d,]+ tokens .*?cut: (\d+) samples \(prompts (\d+), answers (\d+)")
    assert (samples, samples_cut, prompts, answers) == (4, cut, prompts_cut, answers_cut)
    assert number(output, r"dev data: (\d+) samples") == (2,)
    steps = settings.get("max_steps") or 2 * 4  # the multi-task run: 2 epochs of 4 samples at batch 1
    assert number(output, r"steps: (\d+) optimizer steps") == (steps,)
    out = resolved["output_dir"]
    assert f"{out}/adapter/" in output and f"{out}/metrics.json" in output and f"{out}/best/" in output
    every = settings["save_steps"]  # and one at the end; the short multi-task run reaches no save_steps
    saved = f"{steps} (1 in all"
    if steps == 3000:
        saved = {1000: "1000, 2000, 3000 (3 in all", 500: "500, 1000, 1500, 2000, 2500, 3000 (6 in all"}[every]
    assert f"checkpoint at step {saved}" in output
    # nothing was written: no output_dir, no new file anywhere here, and no dataset cache entry
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / out).exists()


DEFAULT_MODEL_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.yaml")
                                if p.name not in RECIPES and not p.name.startswith("accelerate_"))


@pytest.mark.parametrize("example", DEFAULT_MODEL_EXAMPLES)
def test_dry_run_of_the_default_model_examples(example, tmp_path, small_data, capsys):
    train, dev = small_data
    out = tmp_path / "run"
    code = main(["train", str(EXAMPLES / example), f"train_file={train}", f"dev_file={dev}", f"output_dir={out}",
                 "--dry-run"])
    output = capsys.readouterr().out
    assert code == 0, output
    resolved = resolved_yaml(output)
    assert_file_values_kept(EXAMPLES / example, resolved, ("train_file", "dev_file", "output_dir"))
    assert number(output, r"train data: (\d+) samples") == (12,) and number(output, r"dev data: (\d+) samples") == (4,)
    assert not out.exists()


def test_recipe_token_counts_match_the_encoder(tmp_path, capsys):
    """The dry run's token and cut counts are the ones training's encoder gives (ChatGLM2 at 64/128)."""
    from glmtune.data.formats import load_samples
    from glmtune.data.preprocess import Encoder, LengthLimits, encode_samples
    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_tokenizer

    model = model_folder(tmp_path, "chatglm2")
    train = write_rows(tmp_path / "train.jsonl", adgen_rows())
    tokenizer, family, _ = load_tokenizer(str(model))
    samples, _ = load_samples(str(train), prompt_column="content", response_column="summary")
    features, report = encode_samples(samples, Encoder(tokenizer, get_template("auto", tokenizer, family)),
                                      LengthLimits(64, 128, 1024), progress=False)
    tokens = sum(len(f["input_ids"]) for f in features)
    assert tokens < 4 * (64 + 128 + 4)  # every row within its limits (plus the [gMASK] sop and eos marks)

    code = main(["train", str(EXAMPLES / "chatglm2_ptuning.yaml"), f"model={model}", f"train_file={train}",
                 "dev_file=none", f"output_dir={tmp_path / 'out'}", "--dry_run"])
    output = capsys.readouterr().out
    assert code == 0
    assert number(output, r"train data: 4 samples, ([\d,]+) tokens") == (tokens,)
    assert (report.samples_cut, report.prompts_cut, report.answers_cut) == (3, 2, 2)
    assert "best/" not in output  # no dev_file, no best adapter
    assert not (tmp_path / "out").exists()

    # the stored chatglm2-6b-int4 checkpoint: read as stored, the same prefix trains
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    code = main(["train", str(EXAMPLES / "chatglm2_ptuning.yaml"), f"model={model}", f"train_file={train}",
                 "dev_file=none", f"output_dir={tmp_path / 'out'}", "--dry-run"])
    output = capsys.readouterr().out
    assert code == 0, output
    assert number(output, r"trainable parameters: ([\d,]+) of") == (expected_counts("chatglm2_ptuning.yaml")[0],)
    assert "stored quantized to 4 bits" in output and resolved_yaml(output)["quantization_backend"] == "chatglm"
    assert not (tmp_path / "out").exists()


def test_dry_run_on_the_default_model(tmp_path, small_data, default_model_dir, capsys):
    train, dev = small_data
    out = tmp_path / "run"
    code = main(["train", f"train_file={train}", f"dev_file={dev}", f"output_dir={out}", "batch_size=4",
                 "gradient_accumulation_steps=2", "num_train_epochs=3", "lora_rank=4", "lora_target=auto",
                 "save_steps=2", "--dry-run"])
    output = capsys.readouterr().out
    assert code == 0, output
    resolved = resolved_yaml(output)
    assert resolved["model"] == "smollm2-135m" and resolved["learning_rate"] == 2e-3  # LoRA's default at 135M
    assert resolved["precision"] == "fp32" and resolved["template"] in ("chat", "plain")
    # LoRA's default targets for Llama (q_proj, v_proj) at r 4 on the 30-layer, 576-wide model (3 kv heads of 64)
    config = json.loads((default_model_dir / "config.json").read_text())
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    targets = resolved["lora_target"].split(",")
    widths = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    trainable = lora_count(4, layers, [widths[t] for t in targets])
    assert number(output, r"trainable parameters: ([\d,]+) of") == (trainable,)
    # 12 samples / 4 per batch = 3 batches, 2 accumulated per step: 2 steps an epoch, 6 in all
    assert number(output, r"steps: (\d+) optimizer steps") == (6,)
    assert "checkpoint at step 2, 4, 6 (3 in all" in output
    assert number(output, r"train data: (\d+) samples") == (12,)
    assert not out.exists()

    # --nproc 2: the dry run stays in this process and counts 2 x 4 samples a batch: 1 step an epoch
    code = main(["train", f"train_file={train}", f"output_dir={out}", "batch_size=4", "gradient_accumulation_steps=2",
                 "num_train_epochs=3", "save_strategy=no", "--nproc", "2", "--dry-run"])
    output = capsys.readouterr().out
    assert code == 0, output
    assert number(output, r"steps: (\d+) optimizer steps of (\d+) samples") == (3, 16)
    assert "no checkpoints (save_strategy no)" in output and "best/" not in output
    assert not out.exists()


def test_dry_run_refuses_what_training_refuses(tmp_path, small_data, capsys):
    train, _ = small_data
    out = tmp_path / "run"
    out.mkdir()
    (out / "resolved_config.yaml").write_text("method: lora\n")
    code = main(["train", f"train_file={train}", f"output_dir={out}", "--dry-run"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("glmtune: error:")]
    assert code == 2 and len(errors) == 1 and "already holds a training run" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["resolved_config.yaml"]

    code = main(["train", "--dry-run", f"output_dir={tmp_path / 'other'}"])
    err = capsys.readouterr().err
    assert code == 2 and "train_file is required" in err
    code = main(["train", f"train_file={train}", f"model={tmp_path / 'nowhere'}", "--dry-run"])
    assert code == 2 and "model not found" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
