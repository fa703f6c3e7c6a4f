"""glmtune studio's run backend (glmtune/studio/runs.py) with real `glmtune train` processes of the default
model, and what the trainer does for it: the stop on request, max_steps in train_log.jsonl, the lock's
holder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from glmtune.errors import GlmtuneError
from glmtune.studio.runs import RunManager, check_run_name

WAIT_S = 300  # far above the few seconds each run takes: only a hung run fails on it
FAST = ["--max-train-samples", "8", "--batch-size", "2", "--logging-steps", "1", "--cutoff-len", "32"]


def train_words(*extra: str, dev: bool = False) -> list[str]:
    from glmtune.paths import sample_data_dir

    data = ["--train-file", str(sample_data_dir() / "train.jsonl")]
    if dev:
        data += ["--dev-file", str(sample_data_dir() / "dev.jsonl"), "--max-eval-samples", "2"]
    return [*data, *FAST, *extra]


def wait(manager: RunManager, name: str, until=None):
    """The run's info once `until(info)` holds (default: the run has ended)."""
    until = until or (lambda info: info.status not in ("starting", "running"))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        info = manager.info(name)
        if until(info):
            return info
        time.sleep(0.1)
    pytest.fail(f"run {name} is still {manager.info(name).status}; its log:\n{manager.log_tail(name, 4000)}")


def log_entries(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, default_model_dir):
    """(runs folder, info) of a 2-step run with a dev set, started by the manager and waited for."""
    runs = tmp_path_factory.mktemp("studio") / "runs"
    manager = RunManager(runs)
    started = manager.start("ok", train_words("--max-steps", "2", dev=True))
    assert started.status == "starting" and started.max_steps is None
    return runs, wait(manager, "ok")


def test_run_names_are_one_plain_folder_name():
    for bad in ("../x", "/tmp/x", "a/b", ".hidden", "", "..", "a\\b", "a b", "x" * 101, "a\0b"):
        with pytest.raises(GlmtuneError) as caught:
            check_run_name(bad)
        assert "\n" not in str(caught.value)
    assert check_run_name("run-1") == "run-1"
    assert check_run_name("v2.lr_1e-4") == "v2.lr_1e-4"


def test_a_run_finishes_and_a_restarted_studio_sees_the_same(finished):
    runs, info = finished
    folder = runs / "ok"
    assert info.status == "finished", RunManager(runs).log_tail("ok")
    assert (info.name, info.folder, info.step, info.max_steps) == ("ok", folder, 2, 2)
    assert info.adapter is not None and info.adapter.parent == folder and not info.resumable
    assert (info.method, info.model) == ("lora", "smollm2-135m")
    assert info.error.startswith("run written to")  # not failed: the log's last line
    manager = RunManager(runs)
    curves = manager.curves("ok")
    assert [c["step"] for c in curves if "loss" in c] == [1, 2]
    assert all(isinstance(c["loss"], float) for c in curves if "loss" in c)
    assert any(c["step"] == 2 and isinstance(c.get("eval_loss"), float) for c in curves)

    restarted = RunManager(runs)  # a new studio over the same folder: nothing from memory
    assert restarted.info("ok") == info
    assert [r.name for r in restarted.runs()] == ["ok"]
    assert restarted.curves("ok") == curves
    tail = restarted.log_tail("ok")
    assert "run written to" in tail and "\r" not in tail
    assert "training: 100%" in tail  # the progress bar as last drawn
    record = json.loads((folder / "studio.json").read_text())
    assert record["words"] == train_words("--max-steps", "2", dev=True) and record["resumes"] == []
    assert isinstance(record["pid"], int) and isinstance(record["started"], float)


def test_a_bad_option_fails_with_its_one_line_message(tmp_path, capsys, default_model_dir):
    from glmtune.cli import main

    bad = ["--learning-rate", "fast"]
    assert main(["train", *bad, "--output-dir", str(tmp_path / "direct")]) == 2
    expected = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("glmtune: error: ")
    manager = RunManager(tmp_path / "runs")
    manager.start("bad", train_words(*bad))
    info = wait(manager, "bad")
    assert info.status == "failed" and info.error == expected
    assert not info.resumable and info.adapter is None and info.max_steps is None
    with pytest.raises(GlmtuneError, match="nothing to stop"):
        manager.stop("bad")
    with pytest.raises(GlmtuneError, match="cannot be resumed"):
        manager.resume("bad")


def test_a_stopped_run_keeps_a_checkpoint_and_resumes_to_the_end(tmp_path, default_model_dir):
    from glmtune.train.checkpoints import complete_checkpoints

    runs = tmp_path / "runs"
    manager = RunManager(runs)
    folder = runs / "long"
    manager.start("long", train_words("--max-steps", "8", "--save-steps", "100"))
    running = wait(manager, "long", lambda info: info.status == "running" and info.step >= 1 or info.status not in
                   ("starting", "running"))
    assert running.status == "running" and running.max_steps == 8, manager.log_tail("long")
    manager.stop("long")
    stopped = wait(manager, "long")
    assert stopped.status == "stopped", manager.log_tail("long")
    step = stopped.step
    assert 1 <= step < 8 and stopped.resumable and stopped.adapter == folder / "adapter"
    assert [p.name for p in complete_checkpoints(folder)] == [f"checkpoint-{step}"]
    assert json.loads((folder / "metrics.json").read_text())["global_step"] == step
    assert not (folder / "stop_requested").exists()  # removed by the run as it ended
    assert f"stopping at step {step} as requested; continue with --resume" in manager.log_tail("long")
    assert RunManager(runs).info("long").status == "stopped"  # after a restart too

    assert manager.resume("long").status == "starting"
    with pytest.raises(GlmtuneError, match="stop it before resuming"):
        manager.resume("long")
    done = wait(manager, "long")
    assert done.status == "finished" and (done.step, done.max_steps) == (8, 8), manager.log_tail("long")
    entries = log_entries(folder)
    assert [e["step"] for e in entries if "loss" in e] == list(range(1, 9))  # none twice, none missing
    assert [e["max_steps"] for e in entries if "max_steps" in e] == [8, 8]  # at the start and at the resume
    assert len(json.loads((folder / "studio.json").read_text())["resumes"]) == 1


def test_a_killed_run_is_interrupted(tmp_path, default_model_dir):
    manager = RunManager(tmp_path / "runs")
    manager.start("killed", train_words("--max-steps", "50"))
    manager.kill("killed")  # still loading
    info = wait(manager, "killed")
    assert info.status == "interrupted" and not info.resumable
    with pytest.raises(GlmtuneError, match="not running"):
        manager.kill("killed")


def test_start_refuses_the_options_it_owns_and_taken_names(tmp_path):
    runs = tmp_path / "runs"
    manager = RunManager(runs)
    for words in (["--output-dir", "x"], ["--output_dir=x"], ["output_dir=x"], ["--resume"], ["--no-overwrite"],
                  ["--overwrite_output_dir"], ["resume=true"], ["--Output-Dir", "x"]):
        with pytest.raises(GlmtuneError, match="the studio sets"):
            manager.start("new", ["--max-steps", "2", *words])
    assert not (runs / "new").exists()
    for name in ("../escape", "/tmp/abs", "a/b"):
        with pytest.raises(GlmtuneError, match="name"):
            manager.start(name, [])
    assert not (tmp_path / "escape").exists()

    (runs / "old").mkdir(parents=True)
    (runs / "old" / "train_log.jsonl").write_text('{"step": 1, "loss": 2.5}\nnot json\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(GlmtuneError, match="already exists in .*; choose another name, or resume it"):
        manager.start("old", ["--max-steps", "2"])
    (runs / "things").mkdir()
    (runs / "things" / "notes.txt").write_text("mine")
    with pytest.raises(GlmtuneError, match="choose another name"):
        manager.start("things", ["--max-steps", "2"])
    (runs / ".studio").mkdir()  # the page's own folder, and a link out: neither is a run
    (runs / "link").symlink_to(runs / "old")
    old = manager.info("old")  # a run the studio did not start, killed: interrupted, its bad line skipped
    assert (old.status, old.step, old.max_steps, old.started) == ("interrupted", 2, None, None)
    assert manager.curves("old") == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    assert [r.name for r in manager.runs()] == ["old"]
    with pytest.raises(GlmtuneError, match="no run named"):
        manager.info("link")
    with pytest.raises(GlmtuneError, match="no run named"):
        manager.info("things")


# -- the trainer's side -----------------------------------------------------------------------------------


def _stop_callback(folder: Path, holds: str | None):
    from transformers import TrainerControl, TrainerState

    from glmtune.train.callbacks import StopOnRequest
    from glmtune.train.run_folder import STOP_FILE

    path = folder / STOP_FILE
    if holds is not None:
        path.write_text(holds + "\n")
    return StopOnRequest(path), TrainerState(global_step=3, max_steps=10), TrainerControl(), path


def test_a_stop_file_for_this_process_group_stops_with_a_checkpoint(tmp_path):
    callback, state, control, path = _stop_callback(tmp_path, str(os.getpgid(0)))
    args = SimpleNamespace(save_strategy="steps")
    callback.on_train_begin(args, state, control)
    assert path.exists()  # meant for this run: kept until it stops
    callback.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save and control.should_log
    callback.on_train_end(args, state, control)
    assert not path.exists()

    callback, state, control, path = _stop_callback(tmp_path, str(os.getpgid(0)))
    args = SimpleNamespace(save_strategy="no")
    callback.on_train_begin(args, state, control)
    callback.on_step_end(args, state, control)
    assert control.should_training_stop and not control.should_save  # nothing to save a checkpoint with


def test_a_stale_stop_file_does_not_stop_a_run(tmp_path):
    from glmtune.train.callbacks import own_process_groups

    other = str(max(own_process_groups()) + 1_000_000_000)  # no process group has this id
    callback, state, control, path = _stop_callback(tmp_path, other)
    args = SimpleNamespace(save_strategy="steps")
    callback.on_train_begin(args, state, control)
    assert not path.exists()  # removed by the main process at train begin
    path.write_text(other)  # and one written later is ignored too
    callback.on_step_end(args, state, control)
    path.write_text("not a number")
    callback.on_step_end(args, state, control)
    assert not control.should_training_stop and not control.should_save
    callback.on_train_end(args, state, control)
    assert path.exists()  # not this run's to remove


def test_the_log_records_max_steps_again_on_resume_and_plots_without_it(tmp_path):
    from transformers import TrainerState

    from glmtune.train.callbacks import JsonlLog
    from glmtune.train.plot import plot_loss

    path = tmp_path / "train_log.jsonl"
    JsonlLog(path).on_train_begin(None, TrainerState(global_step=0, max_steps=6), None)
    assert [{k: v for k, v in e.items() if k != "time"} for e in log_entries(tmp_path)] == [
        {"step": 0, "max_steps": 6}]
    assert plot_loss(path, tmp_path / "loss.png") is None  # nothing to draw yet, and no error
    with path.open("a") as f:
        f.write("".join(json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n" for s in range(1, 5)))
    JsonlLog(path).on_train_begin(None, TrainerState(global_step=2, max_steps=8), None)
    entries = log_entries(tmp_path)
    assert [(e["step"], e.get("loss"), e.get("max_steps")) for e in entries] == [
        (0, None, 6), (1, 2.9, None), (2, 2.8, None), (2, None, 8)]
    assert plot_loss(path, tmp_path / "loss.png") == tmp_path / "loss.png"


def test_lock_holder_names_the_running_process_and_creates_nothing(tmp_path):
    from glmtune.train.runlock import LOCK_FILE, RunLock, lock_holder

    folder = tmp_path / "run"
    assert lock_holder(folder) is None and not folder.exists()
    with RunLock(folder):
        assert lock_holder(folder) == os.getpid()
        assert lock_holder(folder) == os.getpid()  # looking twice does not take it
    assert lock_holder(folder) is None and not (folder / LOCK_FILE).exists()
    folder.mkdir()
    (folder / LOCK_FILE).write_text("12345\n")  # left by a killed run: holds nothing
    assert lock_holder(folder) is None
    with RunLock(folder):  # and is taken over
        assert lock_holder(folder) == os.getpid()
