"""Issue 17, for the folders commands write into: one training run per output folder (a lock), a resume
that cannot continue is refused before anything is written and one that fails leaves the run's record alone,
and an interrupted export's staging folder does not stay forever."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.errors import GlmtuneError
from glmtune.train.runlock import LOCK_FILE, RunLock

ROW = {"context": "What is 2 + 2?", "target": "4"}


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"context": f"q{i}", "target": f"a{i}"}) + "\n" for i in range(8)),
                    encoding="utf-8")
    return path


def _train(model, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "glmtune", "train", "--model", str(model), "--train-file", str(data),
            "--output-dir", str(out), "--batch-size", "2", "--logging-steps", "1", "--save-steps", "1000", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A LoRA run (rank 8, targets auto: q_proj and v_proj) with checkpoint-1 and checkpoint-2, and its data."""
    from glmtune.config import TrainConfig
    from glmtune.train.trainer import run_training

    root = tmp_path_factory.mktemp("trained")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(ROW) + "\n" for _ in range(4)), encoding="utf-8")
    run_training(TrainConfig(model=str(tiny_model_dir), train_file=str(data), output_dir=str(root / "run"),
                             max_steps=2, save_steps=1, batch_size=2))
    return root / "run", data


def _snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("options, damage, expected", [
    (["--lora-rank", "4"], None, ["run was trained with lora_rank 16", "asks for 4"]),
    (["--method", "ptuning"], None, ["method 'lora'", "'ptuning'"]),
    (["--lora-target", "q_proj"], None, ["lora_target 'down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj'", "'q_proj'"]),
    (["--lora-rank", "4"], lambda run: (run / "resolved_config.yaml").unlink(),  # only the weights can tell
     ["checkpoint-2 (28 tensors) do not fit"]),
    ([], lambda run: _truncate(run / "checkpoint-2" / "optimizer.pt"), ["checkpoint-2/optimizer.pt", "damaged"]),
    ([], lambda run: _truncate(run / "checkpoint-2" / "adapter_model.safetensors"),
     ["adapter_model.safetensors cannot be read", "resume from checkpoint-1"]),
    ([], lambda run: (run / "checkpoint-2" / "trainer_state.json").write_text("[1, 2]"),
     ["trainer_state.json does not hold a trainer state"]),
    ([], lambda run: (run / "checkpoint-2" / "rng_state.pth").write_bytes(b"PK\x03\x04garbage"),
     ["rng_state.pth", "damaged"]),
], ids=["other-rank", "other-method", "other-targets", "weights-do-not-fit", "optimizer-cut-short",
        "adapter-cut-short", "state-not-an-object", "rng-state-garbage"])
def test_a_resume_that_cannot_continue_is_refused_before_writing(trained, tmp_path, tiny_model_dir, capsys, options,
                                                                 damage, expected):
    from glmtune.cli import main

    run, data = trained
    run = Path(shutil.copytree(run, tmp_path / "run"))
    if damage:
        damage(run)
    before = _snapshot(tmp_path)
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(data), "--output-dir", str(run),
                 "--resume", "--max-steps", "3", *options]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("glmtune: error: --resume: ") and all(word in error for word in expected), error
    assert _snapshot(tmp_path) == before  # resolved_config.yaml above all: untouched


def test_the_lock_is_exclusive_created_with_its_folder_and_removed_after(tmp_path):
    out = tmp_path / "a" / "run"
    with RunLock(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(GlmtuneError, match=f"in use by another glmtune train run \\(process {os.getpid()}\\)"):
            RunLock(out).__enter__()
    assert not (tmp_path / "a").exists()  # nothing was written: the folders it made are gone with the lock

    out.mkdir(parents=True)
    (out / LOCK_FILE).write_text("12345\n")  # left by a killed run: a file nobody holds a lock on
    with RunLock(out):
        (out / "resolved_config.yaml").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["resolved_config.yaml"]


def test_a_second_run_into_a_locked_folder_stops_before_writing(tiny_model_dir, data, tmp_path, capsys):
    from glmtune.cli import main

    out = tmp_path / "run"
    with RunLock(out):  # held by another open file: what another process's lock looks like to this one
        code = main(_train(tiny_model_dir, data, out, "--max-steps", "1")[3:])
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"glmtune: error: output_dir {out} is in use by another glmtune train run (process {os.getpid()}); wait for "
        "it to finish, or choose another output_dir")


def test_two_runs_started_into_one_folder_do_not_mix(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    steps = 6
    runs = [subprocess.Popen(_train(tiny_model_dir, data, out, "--max-steps", str(steps)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ)) for _ in range(2)]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], [err[-1500:] for _, err in results]
    refused = next(err for code, err in results if code == 2).strip().splitlines()[-1]
    # Still running: the lock says so. Already finished: its files say so. Never both writing.
    assert "is in use by another glmtune train run" in refused or "already holds a training run" in refused, refused
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == list(range(1, steps + 1))
    assert not (out / LOCK_FILE).exists()


def test_a_resume_that_fails_while_loading_keeps_the_runs_config(trained, tiny_model_dir, tmp_path, monkeypatch):
    """resolved_config.yaml is rewritten only once the Trainer has loaded the checkpoint."""
    from glmtune.cli import main

    run, data = trained
    out = Path(shutil.copytree(run, tmp_path / "run"))
    recorded = (out / "resolved_config.yaml").read_bytes()

    import transformers

    def damaged(self, checkpoint):
        raise RuntimeError("the optimizer state does not load")

    monkeypatch.setattr(transformers.Trainer, "_load_optimizer_and_scheduler", damaged)
    with pytest.raises(RuntimeError, match="does not load"):
        main(["train", "--model", str(tiny_model_dir), "--train-file", str(data), "--output-dir", str(out),
              "--resume", "--max-steps", "3", "--learning-rate", "1e-3"])
    assert (out / "resolved_config.yaml").read_bytes() == recorded
    assert not (out / LOCK_FILE).exists()

    monkeypatch.undo()
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(data), "--output-dir", str(out),
                 "--resume", "--max-steps", "3", "--learning-rate", "1e-3"]) == 0
    assert "learning_rate: 0.001" in (out / "resolved_config.yaml").read_text()


def test_an_interrupted_exports_staging_folder_is_removed_by_the_next(tiny_model_dir, tmp_path):
    from glmtune.config import TrainConfig
    from glmtune.export.run import export_model
    from glmtune.methods import get_method
    from glmtune.methods.adapter import write_adapter_info
    from glmtune.models.loader import fingerprint, load_model

    loaded = load_model(str(tiny_model_dir), device="cpu")
    options = TrainConfig(model=str(tiny_model_dir), lora_rank=2)
    lora = get_method("lora")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora.save(lora.apply(loaded.model, options, loaded.family), adapter)
    write_adapter_info(adapter, method="lora", family=loaded.family, base_model=loaded.name,
                       fingerprint=fingerprint(loaded.model.config), template="auto",
                       parameters=lora.parameters(options, loaded.family))

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process id that has ended
    stale = tmp_path / f".out.export-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1_000_000)  # what a killed export left
    (tmp_path / f".out.replaced-{dead}").mkdir()
    live = tmp_path / f".out.export-{os.getppid()}"  # an export still running (here: our parent process)
    live.mkdir()
    other = tmp_path / f".other.export-{dead}"  # another output's: that export cleans its own
    other.mkdir()

    export_model(adapter, tmp_path / "out", check=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert stale.name not in names and f".out.replaced-{dead}" not in names
    assert live.name in names and other.name in names and "out" in names
