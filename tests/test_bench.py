"""`glmtune bench`: the FLOP count, and both recipes measured side by side on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch


def _lora_model(folder, **options):
    from glmtune.config import TrainConfig
    from glmtune.methods import get_method
    from glmtune.models.loader import load_model

    loaded = load_model(str(folder), dtype="float32")
    cfg = TrainConfig(model=str(folder), **options)
    return loaded, get_method(cfg.method).apply(loaded.model, cfg, loaded.family)


def test_flop_counter_reads_the_decoder_matmuls_lora_and_the_head(tiny_model_dir):
    from glmtune.bench.measure import FlopCounter

    loaded, model = _lora_model(tiny_model_dir, lora_rank=4, lora_target="all-linear")
    c = loaded.model.config
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = (2 * c.hidden_size * c.hidden_size  # q and o
                 + 2 * c.hidden_size * c.num_key_value_heads * head_dim  # k and v
                 + 3 * c.hidden_size * c.intermediate_size)  # gate, up, down
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    counter = FlopCounter.of(model)
    assert counter.matmul_weights == c.num_hidden_layers * per_layer + lora
    assert counter.trained_matmul_weights == lora
    assert counter.head_weights == c.hidden_size * c.vocab_size
    assert counter.attention_width == c.num_hidden_layers * c.hidden_size


def test_flop_counter_charges_work_only_where_it_is_needed():
    from glmtune.bench.measure import FlopCounter

    frozen = FlopCounter(matmul_weights=1000, trained_matmul_weights=0, head_weights=500, attention_width=8,
                         prefix_length=0)
    # 4 FLOPs per frozen weight and token (forward and input gradient), 6 where the weight trains
    assert FlopCounter(1000, 10, 500, 8, 0).sample(7, 0) - frozen.sample(7, 0) == 2 * 10 * 7
    # the output layer only at labelled positions: forward and input gradient
    assert frozen.sample(7, 3) - frozen.sample(7, 0) == 4 * 500 * 3
    # attention grows with the causal pairs, n(n+1)/2, and a prefix adds n * pre_seq_len pairs
    attention = frozen.sample(7, 0) - 4 * 1000 * 7
    assert attention == 12 * 8 * (7 * 8 / 2)
    with_prefix = FlopCounter(1000, 0, 500, 8, prefix_length=5)
    assert with_prefix.sample(7, 0) - frozen.sample(7, 0) == 12 * 8 * 7 * 5


def _bench_config(folder, data, **options):
    from glmtune.config import TrainConfig

    return TrainConfig(model=str(folder), train_file=str(data), batch_size=2, max_source_length=24,
                       max_target_length=16, lora_dropout=0.0, **options)


def test_both_recipes_measured_side_by_side(tiny_model_dir, small_data):
    from glmtune.bench.run import BenchSettings, format_table, run_bench

    summary = run_bench(BenchSettings(_bench_config(tiny_model_dir, small_data[0]), steps=3, warmup_steps=1),
                        in_process=True)
    ours, tutorial = summary["recipes"]["glmtune"], summary["recipes"]["tutorial"]
    assert (tutorial["padding"], tutorial["gradient_checkpointing"], tutorial["logits"]) == ("fixed", True, "all")
    assert (ours["padding"], ours["gradient_checkpointing"], ours["logits"]) == ("padding-free", False, "labelled")
    # the tutorial pads every sample to 24 + 16 tokens: 2 x 40 per step
    assert tutorial["padded_tokens_per_s"] == pytest.approx(tutorial["steps_per_s"] * 2 * 40)
    assert tutorial["samples_per_s"] == pytest.approx(tutorial["steps_per_s"] * 2)
    for result in (ours, tutorial):
        assert 0 < result["real_tokens_per_s"] <= result["padded_tokens_per_s"]
        assert result["peak_memory_bytes"] > 0 and 0 < result["mfu"] < 2
        assert result["mfu"] == pytest.approx(result["model_flops_per_s"] / result["matmul_peak_flops_per_s"])
    assert tutorial["padding_share"] > ours["padding_share"]
    ratio = summary["glmtune_vs_tutorial"]
    assert ratio["real_tokens_per_s"] == pytest.approx(ours["real_tokens_per_s"] / tutorial["real_tokens_per_s"])
    table = format_table(summary)
    assert "glmtune / tutorial: real tokens/s x" in table and "tutorial" in table


def test_packed_p_tuning_recipe(tiny_model_dir, small_data):
    from glmtune.bench.run import BenchSettings, run_bench

    cfg = _bench_config(tiny_model_dir, small_data[0], method="ptuning", pre_seq_len=4, packing=True, cutoff_len=96)
    result = run_bench(BenchSettings(cfg, steps=2, warmup_steps=1, recipes=("glmtune",)), in_process=True)
    packed = result["recipes"]["glmtune"]
    assert packed["padding"] == "packed" and packed["method"] == "ptuning"
    assert packed["samples_per_s"] > 2 * packed["steps_per_s"]  # more than one sample per packed row


def test_bench_command_runs_each_recipe_in_its_own_process(tiny_model_dir, small_data, tmp_path, capsys):
    from glmtune.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_model_dir), "--data", str(small_data[0]), "--steps", "1",
                 "--warmup-steps", "1", "--batch-size", "2", "--max-source-length", "24", "--max-target-length", "16",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert summary == json.loads(out.read_text())
    assert set(summary["recipes"]) == {"glmtune", "tutorial"}
    assert summary["recipes"]["tutorial"]["peak_memory_kind"] == "resident, training only"


def test_tutorial_recipe_needs_both_limits(tiny_model_dir, small_data, capsys):
    from glmtune.cli import main

    code = main(["bench", "--model", str(tiny_model_dir), "--data", str(small_data[0]), "--max-source-length", "24",
                 "--recipe", "tutorial", "--in-process"])
    assert code == 2
    assert "max_source_length + max_target_length" in capsys.readouterr().err


def test_matmul_peak_is_a_plausible_rate():
    from glmtune.bench.measure import matmul_peak

    assert 1e8 < matmul_peak("cpu", torch.float32) < 1e14


def test_bench_without_data_or_with_broken_data_fails_before_training(tmp_path, capsys):
    from glmtune.cli import main

    assert main(["bench", "--in-process"]) == 2
    assert "bench needs --data FILE" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"context": "a", "target": "b"}\n{not json\n', encoding="utf-8")
    assert main(["bench", "--data", str(broken)]) == 2
    assert "broken.jsonl" in capsys.readouterr().err
