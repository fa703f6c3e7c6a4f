"""`glmtune bench` measures what `glmtune train` does: both go through train/recipe.py's stages, so for the
same options they build the same model (trainable parameter names and initial values), feed it the same
batches in the same order, and run the Trainer with the same settings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

# The TrainingArguments fields that decide what a training step computes and in which order.
SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
            "max_grad_norm", "lr_scheduler_type", "warmup_steps", "optim", "seed", "max_steps",
            "train_sampling_strategy", "activation_checkpointing", "bf16", "fp16", "use_cpu", "dataloader_num_workers",
            "remove_unused_columns", "label_names")
STEPS = 2


def _first_steps(monkeypatch, run) -> dict:
    """What the Trainer sees in its first STEPS training steps when `run()` trains: the model's parameters
    before the first update, each step's batch, the settings, optimizer and loss mode."""
    from glmtune.train.loss import LabelledLossTrainer

    seen: dict = {"batches": []}
    original = LabelledLossTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        if not seen["batches"]:
            seen["trainable"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            seen["frozen"] = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
            seen["settings"] = {name: getattr(self.args, name) for name in SETTINGS}
            seen["optimizer"] = type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__
            seen["labelled_logits"] = self.fast_loss is not False
        seen["batches"].append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(LabelledLossTrainer, "training_step", training_step)
    run()
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("options", [{}, {"packing": True, "cutoff_len": 96, "method": "ptuning", "pre_seq_len": 4}],
                         ids=["lora", "packed-ptuning"])
def test_bench_and_train_build_the_same_model_data_order_and_trainer(tiny_model_dir, small_data, tmp_path,
                                                                     monkeypatch, options):
    from glmtune.bench.run import run_recipe
    from glmtune.config import TrainConfig
    from glmtune.train.trainer import run_training

    cfg = TrainConfig(model=str(tiny_model_dir), train_file=str(small_data[0]), max_steps=STEPS, batch_size=2,
                      max_source_length=24, max_target_length=16, lora_target="all-linear", seed=7,
                      save_strategy="no", **options)
    trained = _first_steps(monkeypatch, lambda: run_training(replace(cfg, output_dir=str(tmp_path / "run"))))
    benched = _first_steps(monkeypatch, lambda: run_recipe(cfg, "glmtune", steps=1, warmup_steps=STEPS - 1))

    assert trained["trainable"] and sorted(trained["trainable"]) == sorted(benched["trainable"])
    for name, value in trained["trainable"].items():
        assert torch.equal(value, benched["trainable"][name]), name
    assert sorted(trained["frozen"]) == sorted(benched["frozen"])
    assert all(torch.equal(value, benched["frozen"][name]) for name, value in trained["frozen"].items())

    assert len(trained["batches"]) == len(benched["batches"]) == STEPS
    for ours, theirs in zip(trained["batches"], benched["batches"]):
        assert sorted(ours) == sorted(theirs)
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key

    assert trained["settings"] == benched["settings"]
    assert trained["settings"]["learning_rate"] == (5e-2 if options.get("method") == "ptuning" else 2e-3)
    assert (trained["optimizer"], trained["labelled_logits"]) == (benched["optimizer"], benched["labelled_logits"])
