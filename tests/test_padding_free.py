"""Padding-free batches (the default): each step's samples, drawn as for padded batches, side by side in one
row. That they train exactly as padded batches is tests/test_packing.py's (loss and gradients, every family)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch


def _config(tiny_model_dir, small_data, tmp_path, **options):
    from glmtune.config import TrainConfig

    train, _ = small_data
    return TrainConfig(model=str(tiny_model_dir), train_file=str(train), output_dir=str(tmp_path / "out"),
                       batch_size=4, num_train_epochs=1, seed=3, **options)


def _samples_of(batch) -> list[tuple[int, ...]]:
    """The samples in a one-row batch, cut where the positions restart."""
    ids, positions = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    return [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])]


def test_an_epoch_of_padding_free_batches_holds_every_sample_once_in_shuffled_order(tiny_model_dir, small_data,
                                                                                     tmp_path):
    from glmtune.train.recipe import build_trainer, prepare

    prepared = prepare(_config(tiny_model_dir, small_data, tmp_path))
    assert prepared.cfg.padding_free and prepared.collator.one_row
    trainer = build_trainer(prepared, [])
    features = [tuple(f["input_ids"]) for f in prepared.train_features]
    seen, sizes = [], []
    for batch in trainer.get_train_dataloader():
        assert batch["input_ids"].shape[0] == 1  # one row
        assert int(batch["glmtune_real_tokens"]) == batch["input_ids"].numel()  # and no padding in it
        samples = _samples_of(batch)
        sizes.append(len(samples))
        seen += samples
    assert sizes == [4, 4, 4]  # batch_size samples per step, as with padded batches
    assert sorted(seen) == sorted(features)  # each sample exactly once
    assert seen != features  # in the sampler's shuffled order, not the file's


def test_a_sample_start_is_never_the_previous_samples_target():
    """Alone, a sample's first token is predicted from nothing; side by side it must not become the
    previous sample's last token's target, even where its label is set."""
    from glmtune.data.collate import PackCollator, PadCollator

    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    flat = PackCollator(0, one_row=True)(features)
    assert flat["labels"].tolist() == [[5, 6, 7, -100, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    padded = PadCollator(0)(features)
    # the targets trained (labels from position 1 on) are the same
    assert int((flat["labels"][:, 1:] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum()) == 3


def test_a_model_that_cannot_keep_samples_apart_trains_on_padded_batches(tiny_model_dir, small_data, tmp_path,
                                                                         caplog):
    from glmtune.data.collate import PadCollator
    from glmtune.models.loader import load_model
    from glmtune.train.recipe import prepare

    caplog.set_level(logging.INFO)
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    loaded.model.config._attn_implementation = "flash_attention_2"  # its kernels are never called here
    prepared = prepare(_config(tiny_model_dir, small_data, tmp_path), loaded)
    assert isinstance(prepared.collator, PadCollator)
    assert prepared.cfg.padding_free is False  # resolved_config.yaml says what was used
    assert "padded batches: " in caplog.text and "cannot keep samples apart" in caplog.text


def test_packing_turns_padding_free_off_in_the_resolved_config(tiny_model_dir, small_data, tmp_path):
    from glmtune.config import resolve

    cfg = _config(tiny_model_dir, small_data, tmp_path)
    assert resolve(cfg).padding_free is True
    assert resolve(replace(cfg, packing=True)).padding_free is False
    assert resolve(replace(cfg, padding_free=False)).padding_free is False


def test_the_run_reports_its_padding_and_peak_memory(tiny_model_dir, small_data, tmp_path, train_tiny, caplog):
    caplog.set_level(logging.INFO)
    padded = train_tiny(tiny_model_dir, (small_data[0], None), tmp_path / "padded", max_steps=3, padding_free=False)
    usage = padded.metrics["batches_and_memory"]
    assert usage["batching"] == "padded" and 0 < usage["padding_share"] < 1
    assert usage["in_batches"] > usage["real"] > 0
    assert usage["peak_memory_bytes"] > 50 * 2**20 and usage["peak_memory_kind"].startswith("resident")
    assert f"training: padded batches, {usage['padding_share']:.1%} padding; peak memory" in caplog.text
    flat = train_tiny(tiny_model_dir, (small_data[0], None), tmp_path / "flat", max_steps=3)
    usage = flat.metrics["batches_and_memory"]
    assert usage["batching"] == "padding-free" and usage["padding_share"] == 0
    assert usage["real"] == usage["in_batches"] == padded.metrics["batches_and_memory"]["real"]
    assert torch.isfinite(torch.tensor(flat.metrics["train"]["train_loss"]))


def test_gradient_checkpointing_auto_is_what_the_trainer_turns_on(tiny_model_dir, small_data, tmp_path, train_tiny):
    from transformers.modeling_layers import GradientCheckpointingLayer

    def recomputing(model) -> int:
        return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)

    roomy = train_tiny(tiny_model_dir, (small_data[0], None), tmp_path / "roomy", max_steps=1)
    plan = roomy.metrics["batches_and_memory"]["gradient_checkpointing"]
    assert plan["recomputed_layers"] == 0 and plan["layers"] == 2 and recomputing(roomy.model) == 0
    resolved = (roomy.output_dir / "resolved_config.yaml").read_text()
    assert "gradient_checkpointing: null" in resolved  # auto, with the budget it used written down
    assert f"memory_budget: {round(plan['budget_bytes'] / 2**30, 2)}\n" in resolved
    tight = train_tiny(tiny_model_dir, (small_data[0], None), tmp_path / "tight", max_steps=1, memory_budget=0.001)
    plan = tight.metrics["batches_and_memory"]["gradient_checkpointing"]
    assert plan["recomputed_layers"] == 2 and recomputing(tight.model) == 2
