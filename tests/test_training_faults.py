"""Faults during training. Steps whose loss or gradients are NaN are skipped and counted (their update never
reaches a weight), or training stops with a message naming the step and the last good checkpoint, which
resumes. A checkpoint that cannot be written (a full disk) is one clear error, and the last one stays."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from glmtune.cli import main
from glmtune.train.loss import LabelledLossTrainer

pytestmark = pytest.mark.slow


@pytest.fixture
def poisoned(monkeypatch):
    """poisoned(steps): the loss of those (1-based) optimizer steps becomes NaN."""
    original = LabelledLossTrainer.compute_loss

    def install(steps):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = original(self, model, inputs, return_outputs, num_items_in_batch)
            if model.training and self.state.global_step + 1 in steps:
                return (result[0] * torch.nan, result[1]) if return_outputs else result * torch.nan
            return result

        monkeypatch.setattr(LabelledLossTrainer, "compute_loss", compute_loss)

    return install


def train(tiny_model_dir, tmp_path, write_jsonl, *extra) -> int:
    data = write_jsonl([{"context": f"q{i} + {i}", "target": f"answer {i * 3}"} for i in range(24)], "train.jsonl")
    return main(["train", f"model={tiny_model_dir}", f"train_file={data}", f"output_dir={tmp_path / 'run'}",
                 "max_steps=8", "save_steps=2", "batch_size=4", "logging_steps=1", "lora_dropout=0",
                 "learning_rate=5e-3", *extra])


def lora(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_nonfinite_steps_are_skipped_counted_and_logged_as_such(tiny_model_dir, tmp_path, write_jsonl, poisoned,
                                                                 capsys):
    poisoned({3, 4})
    assert train(tiny_model_dir, tmp_path, write_jsonl) == 0
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nonfinite_steps_skipped"] == 2 and metrics["global_step"] == 8
    err = capsys.readouterr().err
    assert "step 3: the loss or gradients are not finite" in err and "2 steps were skipped" in err
    log = {entry["step"]: entry for entry in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
           if "learning_rate" in entry}  # the per-step lines, not the closing summary
    assert "loss" not in log[3] and log[3]["nonfinite_skipped"] == 1  # no made-up loss for a skipped step
    assert all(log[s]["loss"] > 1 for s in (1, 2, 5, 6, 7, 8))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_skipped_step_leaves_every_weight_as_it_was(tiny_model_dir, tmp_path, write_jsonl, poisoned):
    poisoned({3, 4})
    assert train(tiny_model_dir, tmp_path, write_jsonl, "max_steps=4", "save_total_limit=5") == 0
    out = tmp_path / "run"
    after_2, after_4 = lora(out / "checkpoint-2"), lora(out / "checkpoint-4")
    final = lora(out / "adapter")
    assert all(torch.equal(after_2[k], after_4[k]) and torch.equal(after_2[k], final[k]) for k in after_2)
    assert any(after_2[k].abs().max() > 0 for k in after_2 if "lora_B" in k)  # steps 1-2 did train (B starts at 0)


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(tiny_model_dir, tmp_path, write_jsonl,
                                                                        poisoned, capsys):
    poisoned(set(range(3, 100)))
    assert train(tiny_model_dir, tmp_path, write_jsonl, "max_nonfinite_steps=3", "save_total_limit=5") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    out = tmp_path / "run"
    assert error.startswith("glmtune: error: training stopped at step 5:")
    assert "3 steps in a row were not finite" in error and f"{out / 'checkpoint-4'}" in error
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    after_2, after_4 = lora(out / "checkpoint-2"), lora(out / "checkpoint-4")
    assert all(torch.equal(after_2[k], after_4[k]) for k in after_2)  # the named checkpoint holds good weights

    poisoned(set())  # the cause is gone (say, a lower learning rate): the run continues from it
    assert train(tiny_model_dir, tmp_path, write_jsonl, "--resume", "save_total_limit=5") == 0
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8


def test_nonfinite_stop_stops_at_the_first_bad_step(tiny_model_dir, tmp_path, write_jsonl, poisoned, capsys):
    poisoned({3})
    assert train(tiny_model_dir, tmp_path, write_jsonl, "nonfinite=stop") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training stopped at step 3" in error and "nonfinite is stop" in error
    assert "checkpoint-2" in error


def test_a_full_disk_during_a_checkpoint_is_one_clear_error_and_leaves_the_last_one(tiny_model_dir, tmp_path,
                                                                                    write_jsonl, monkeypatch, capsys):
    import errno

    import transformers

    original = transformers.Trainer._save_optimizer_and_scheduler

    def full(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full)
    assert train(tiny_model_dir, tmp_path, write_jsonl) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    out = tmp_path / "run"
    assert error == (f"glmtune: error: cannot write checkpoint 4 to {out}: No space left on device; the last "
                     f"complete checkpoint is {out / 'checkpoint-2'} (free space, then --resume)")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".saving"))) == ["checkpoint-2"]
