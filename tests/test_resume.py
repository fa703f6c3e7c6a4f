"""Killed with SIGKILL at any moment, even inside a checkpoint save, a run resumed with --resume ends with
the adapter an uninterrupted run with the same seed makes; checkpoints and adapters are never left
half-written where resume or a user would pick them up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume-data") / "train.jsonl"
    rows = [{"context": f"Question {i}: what is {i} times {i % 7}?", "target": f"It is {i * (i % 7)}."}
            for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def command(tiny_model_dir, data, out, *extra) -> list[str]:
    """Dropout on (0.1), so the resumed run must also restore the random number generators."""
    return [sys.executable, "-m", "glmtune", "train", f"model={tiny_model_dir}", f"train_file={data}",
            f"output_dir={out}", f"max_steps={STEPS}", "save_steps=2", "batch_size=4", "lora_dropout=0.1",
            "logging_steps=1", "seed=7", "learning_rate=5e-3", *extra]


def run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ), **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def adapter_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = adapter_weights(a), adapter_weights(b)
    assert first.keys() == second.keys()
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    assert worst <= 1e-5, f"adapters differ by {worst}"
    moved = max(first[k].abs().max().item() for k in first if "lora_B" in k)
    assert moved > 1e-3  # training really changed the adapter, so equality is not trivial


def logged_steps(out: Path) -> list[int]:
    lines = (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(command(tiny_model_dir, data, out))
    return out


KILL_INSIDE_SAVE = """
import os, signal, sys
import transformers
from glmtune.cli import main

original = transformers.Trainer._save_rng_state

def dying(self, output_dir):
    if self.state.global_step == 4:  # the model and optimizer of checkpoint 4 are written; die mid-save
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir)

transformers.Trainer._save_rng_state = dying
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_inside_a_checkpoint_save_resumes_from_the_last_complete_one(tiny_model_dir, data, tmp_path,
                                                                            reference):
    out = tmp_path / "run"
    args = command(tiny_model_dir, data, out)
    killed = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE, *args[3:]], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert (out / ".saving-4").is_dir()  # the half-written checkpoint, under a name resume never picks

    resumed = run(args + ["--resume"])
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert not list(out.glob(".saving-*"))
    assert_same_adapter(out, reference)
    assert logged_steps(out) == list(range(1, STEPS + 1))  # no step logged twice, none missing


def test_kills_at_any_moment_then_resume_give_the_uninterrupted_adapter(tiny_model_dir, data, tmp_path, reference):
    out = tmp_path / "run"
    args = command(tiny_model_dir, data, out)
    for wait_for in ("checkpoint-2", "checkpoint-6"):
        first = not (out / "resolved_config.yaml").exists()
        process = subprocess.Popen(args + ([] if first else ["--resume"]), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=dict(os.environ))
        deadline = time.monotonic() + 300
        while not (out / wait_for).is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, f"the run ended before it could be killed (exit {process.returncode})"
        process.send_signal(signal.SIGKILL)  # wherever it is now: training, logging or the next save
        process.wait()
        assert process.returncode == -signal.SIGKILL  # the kill, not the end of the run, stopped it
        assert (out / wait_for).is_dir() and not (out / "adapter").exists() and not (out / "metrics.json").exists()
    for checkpoint in out.glob("checkpoint-*"):
        assert (checkpoint / "trainer_state.json").is_file()  # every visible checkpoint is whole
    run(args + ["--resume"])
    assert_same_adapter(out, reference)
    assert logged_steps(out) == list(range(1, STEPS + 1))


def test_the_same_folder_without_resume_or_overwrite_is_refused(tiny_model_dir, data, reference):
    before = sorted(p.name for p in reference.iterdir())
    result = subprocess.run(command(tiny_model_dir, data, reference), capture_output=True, text=True, timeout=120,
                            env=dict(os.environ))
    assert result.returncode == 2
    assert "already holds a training run" in result.stderr and "--resume" in result.stderr
    assert sorted(p.name for p in reference.iterdir()) == before


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
    from glmtune.train.checkpoints import complete_checkpoints, staged_folder

    target = tmp_path / "adapter"
    with staged_folder(target) as staged:
        (staged / "weights").write_text("one")
    with pytest.raises(RuntimeError):
        with staged_folder(target) as staged:
            (staged / "weights").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (target / "weights").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with staged_folder(target) as staged:
        (staged / "weights").write_text("two")
    assert (target / "weights").read_text() == "two"

    for name, whole in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False), ("other-3", True)):
        (tmp_path / name).mkdir()
        if whole:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
