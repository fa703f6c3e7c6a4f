"""tools/gpu_check.py: the GPU check runs end to end with --tiny on the CPU (so it never rots before a GPU
comes), records a failing or overrunning section without stopping the others, and refuses bad arguments."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.paths import shared_dir

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"
NEEDED = ("fixtures/golden/chatglm/golden.safetensors", "fixtures/tokenizers/chatglm2-6b/tokenizer.model",
          "data/seed_mixed/mixed_train_dataset.jsonl")

needs_shared = pytest.mark.skipif(not all((shared_dir() / p).is_file() for p in NEEDED),
                                  reason="the GPU check reads golden fixtures, tokenizers and data under "
                                         f"{shared_dir()} (set GLMTUNE_SHARED)")


def _check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    finished = _check("--out", str(out), "--tiny", "--device", "cpu")
    return finished, out, json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))


@needs_shared
@pytest.mark.slow
def test_tiny_check_passes_every_section(tiny_run):
    finished, out, results = tiny_run
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert results["ok"] is True
    assert [name for name, s in results["sections"].items() if s["status"] == "ok"] == \
        ["correctness", "training", "serving", "estimate"]
    assert results["versions"]["torch"] and results["machine"]["python"]
    markdown = (out / "gpu_check.md").read_text(encoding="utf-8")
    for heading in ("## 1. Correctness", "## 2. Full-size training", "## 3. Serving", "## 4. Memory estimate"):
        assert heading in markdown


@needs_shared
@pytest.mark.slow
def test_tiny_correctness_matches_the_official_outputs(tiny_run):
    items = tiny_run[2]["sections"]["correctness"]["items"]
    by_name = {item["name"]: item for item in items}
    for family in ("chatglm", "chatglm2", "chatglm3"):
        assert by_name[f"{family} float32 logits vs official"]["value"] < 1e-4
        assert by_name[f"{family} greedy tokens vs official"]["value"] is True
        assert by_name[f"{family} P-Tuning v2 greedy tokens vs official"]["value"] is True
        assert 0 < by_name[f"{family} bfloat16 logits vs float32"]["value"] <= 0.1  # rounded, but close
    steps = [item for item in items if "train steps" in item["name"]]
    assert len(steps) == 4 and all(item["ok"] for item in steps)


@needs_shared
@pytest.mark.slow
def test_tiny_training_measures_every_case_and_recipe(tiny_run):
    from glmtune.bench.gpu.training import CASES, TINY_LOOP_STEPS

    rows = {item["name"]: item for item in tiny_run[2]["sections"]["training"]["items"]}
    for case in CASES:
        for recipe in case.recipes:
            row = rows[f"{case.name} {recipe}"]
            assert row["ok"] is True, row.get("error")
            if case.loop_steps:
                assert row["losses_logged"] == TINY_LOOP_STEPS and row["nonfinite_losses"] == 0
                continue
            assert row["peak_memory_bytes"] > 0 and row["real_tokens_per_s"] > 0 and 0 < row["mfu"] < 1
            # padding-free batches (glmtune's default) hold the step's samples side by side in one row
            assert row["largest_batch"]["rows"] == (1 if row["padding"] == "padding-free" else row["batch_size"])
            assert row["estimate"]["bytes"] > 0
    # the tutorial recipe pads every sample to max_source_length + max_target_length; glmtune pads nothing
    for case in ("chatglm3-lora", "chatglm6b-lora-fp16"):
        ours, theirs = rows[f"{case} glmtune"], rows[f"{case} tutorial"]
        assert theirs["largest_batch"]["length"] == theirs["padded_length"]
        assert ours["largest_batch"]["length"] <= ours["batch_size"] * theirs["padded_length"]
        assert ours["padding_share"] == 0 <= theirs["padding_share"]


@needs_shared
@pytest.mark.slow
def test_tiny_serving_and_estimate_sections(tiny_run):
    sections = tiny_run[2]["sections"]
    serving = sections["serving"]["items"]
    assert [item["concurrency"] for item in serving] == [1, 4]
    assert all(item["errors"] == 0 and item["completion_tokens"] > 0 for item in serving)
    estimates = sections["estimate"]["items"]
    compared = [item for item in estimates if "estimate_bytes" in item]
    dry_runs = [item for item in estimates if "dry_run_bytes" in item]
    assert len(compared) == sum(1 for item in sections["training"]["items"] if item.get("peak_memory_bytes"))
    assert dry_runs and all(item["ok"] and item["dry_run_bytes"] > 0 for item in dry_runs)


@needs_shared
def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path):
    shared = tmp_path / "shared"  # tokenizers and data, but no golden outputs: correctness cannot run
    for part in ("fixtures/tokenizers", "data/seed_mixed"):
        shutil.copytree(shared_dir() / part, shared / part)
    out = tmp_path / "out"
    finished = _check("--out", str(out), "--tiny", "--device", "cpu", "--shared", str(shared),
                      "--only", "correctness,serving")
    assert finished.returncode == 1
    results = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    correctness, serving = results["sections"]["correctness"], results["sections"]["serving"]
    assert correctness["status"] == "failed"
    assert "golden fixtures not found" in correctness["items"][0]["error"]
    assert serving["status"] == "ok" and len(serving["items"]) == 2
    assert results["sections"]["training"]["status"] == "not run"
    assert "FAILED" in (out / "gpu_check.md").read_text(encoding="utf-8")


@needs_shared
def test_a_section_past_its_budget_is_stopped_and_the_next_runs(tmp_path):
    out = tmp_path / "out"
    finished = _check("--out", str(out), "--tiny", "--device", "cpu", "--only", "correctness,estimate",
                      "--budget", "correctness=3")  # the golden checks alone take longer than 3 s
    assert finished.returncode == 1
    results = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert results["sections"]["correctness"]["status"] == "timeout"
    assert results["sections"]["correctness"]["seconds"] < 60
    estimate = results["sections"]["estimate"]
    assert estimate["status"] == "ok" and estimate["items"][0]["ok"] is None  # nothing measured to compare with


@pytest.mark.parametrize("args, message", [
    (["--only", "training,speed"], "unknown section speed"),
    (["--budget", "training=soon"], "--budget 'training=soon'"),
    (["--device", "cuda"], "PyTorch sees no CUDA GPU"),
    (["--device", "cpu", "--no-tiny"], "the full-size check needs a GPU"),
])
def test_bad_arguments_are_refused_with_one_line(tmp_path, args, message):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is no error here")
    out = tmp_path / "out"
    tiny = [] if "--no-tiny" in args else ["--tiny"]
    finished = _check("--out", str(out), *tiny, *[a for a in args if a != "--no-tiny"], timeout=120)
    assert finished.returncode == 2
    assert message in finished.stderr and len(finished.stderr.strip().splitlines()) == 1
    assert not out.exists()
