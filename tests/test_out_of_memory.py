"""Out of memory while training, evaluating or answering: one line naming where it happened and this run's values
that would lower the memory needed, exit 2, the last complete checkpoint kept and named (and no checkpoint cut
short left behind); eval keeps the rows it wrote, a server answers the next request. The errors are raised by
patches (a counter proves each fired) with the messages PyTorch's allocators raise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from glmtune.cli import main
from glmtune.config import GenerationOptions
from glmtune.data.formats import Message
from glmtune.errors import GlmtuneError
from glmtune.inference.generate import Generator
from glmtune.oom import is_out_of_memory, where
from glmtune.serve.engine import ChatEngine, ChatRequest, Failed, Finished
from glmtune.train.loss import LabelledLossTrainer

CUDA_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.65 GiB of which "
                "1.06 GiB is free.")
CPU_MESSAGE = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
               "allocate 1073741824 bytes.")


def test_out_of_memory_is_recognised_on_every_device_and_nothing_else_is():
    for error in (torch.OutOfMemoryError(CUDA_MESSAGE), torch.cuda.OutOfMemoryError(CUDA_MESSAGE),
                  RuntimeError(CPU_MESSAGE), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"),
                  RuntimeError("CUDA error: out of memory"), MemoryError(),
                  RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")):
        assert is_out_of_memory(error), error
    for error in (RuntimeError("boom"), ValueError("out of memory"), OSError(28, "No space left on device")):
        assert not is_out_of_memory(error), error
    assert where(torch.OutOfMemoryError(CUDA_MESSAGE)) == "the GPU"
    assert where(RuntimeError(CPU_MESSAGE)) == where(MemoryError()) == "the CPU (the machine's RAM)"
    assert where(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")) == "the GPU"


# -- training ---------------------------------------------------------------------------------------------


def train(tiny_model_dir, out, data, *extra, max_steps=4, save_steps=2) -> int:
    return main(["train", f"model={tiny_model_dir}", f"train_file={data}", f"output_dir={out}",
                 f"max_steps={max_steps}", f"save_steps={save_steps}", "batch_size=4", "logging_steps=1",
                 "learning_rate=5e-3", *extra])


@pytest.fixture
def rows(write_jsonl):
    return write_jsonl([{"context": f"q{i} + {i}", "target": f"answer {i * 3}"} for i in range(24)], "train.jsonl")


@pytest.fixture
def out_of_memory_in(monkeypatch):
    """out_of_memory_in(step, error) -> counter: the loss of that (1-based) optimizer step raises `error`."""

    def install(step, error):
        original = LabelledLossTrainer.compute_loss
        fired = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.state.global_step + 1 == step:
                fired.append(step)
                raise error
            return original(self, model, inputs, *args, **kwargs)

        monkeypatch.setattr(LabelledLossTrainer, "compute_loss", compute_loss)
        return fired

    return install


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def auto_budget() -> str:
    """The memory_budget gradient_checkpointing auto used on this machine, as the message writes it."""
    from glmtune.train.recompute import default_budget_gib

    return f"{round(default_budget_gib('cpu')[0], 2):g}"


def test_out_of_memory_in_a_step_names_the_step_the_values_and_the_checkpoint_which_resumes(
        tiny_model_dir, tmp_path, rows, out_of_memory_in, monkeypatch, capsys):
    out = tmp_path / "run"
    fired = out_of_memory_in(3, torch.OutOfMemoryError(CUDA_MESSAGE))
    assert train(tiny_model_dir, out, rows, "gradient_accumulation_steps=2", save_steps=1) == 2
    assert fired == [3]
    assert last_error(capsys) == (
        "glmtune: error: out of memory on the GPU at step 3 of 4 while training: lower batch_size (4; raise "
        "gradient_accumulation_steps, now 2, to keep the effective batch of 8), cutoff_len (1024), turn on "
        f"gradient_checkpointing or lower memory_budget, now {auto_budget()} GiB, set quantization_bit 4 (now full "
        "weights); the last complete checkpoint is "
        f"{out / 'checkpoint-2'} (continue from it with --resume and the lowered values)")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".saving"))) == \
        ["checkpoint-1", "checkpoint-2"]
    assert not (out / "adapter").exists()  # no final adapter from a run that did not finish
    # The named checkpoint is whole: the run continues from it with the lowered values, as the message says.
    monkeypatch.undo()
    assert train(tiny_model_dir, out, rows, "--resume", "batch_size=2", "gradient_accumulation_steps=4",
                 "gradient_checkpointing=true") == 0
    assert fired == [3] and json.loads((out / "metrics.json").read_text())["global_step"] == 4


def test_cpu_out_of_memory_while_saving_leaves_no_half_checkpoint(tiny_model_dir, tmp_path, rows, monkeypatch, capsys):
    import transformers

    original = transformers.Trainer._save_optimizer_and_scheduler
    fired = []

    def save(self, output_dir):
        if self.state.global_step == 2:
            fired.append(2)
            raise RuntimeError(CPU_MESSAGE)
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", save)
    out = tmp_path / "run"
    assert train(tiny_model_dir, out, rows, "method=ptuning", "pre_seq_len=4", save_steps=1) == 2
    assert fired == [2]
    # On the CPU a 4-bit base is no way out (its kernels are the GPU's): not suggested.
    assert last_error(capsys) == (
        "glmtune: error: out of memory on the CPU (the machine's RAM) while saving at step 2 of 4: lower batch_size "
        "(4; raise gradient_accumulation_steps, now 1, to keep the effective batch of 4), cutoff_len (1024), turn "
        f"on gradient_checkpointing or lower memory_budget, now {auto_budget()} GiB, lower pre_seq_len (4; this "
        "needs a new run); the last complete checkpoint is "
        f"{out / 'checkpoint-1'} (continue from it with --resume and the lowered values)")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".saving"))) == ["checkpoint-1"]


def test_out_of_memory_while_evaluating_names_the_evaluation_values(tiny_model_dir, tmp_path, rows, write_jsonl,
                                                                    monkeypatch, capsys):
    dev = write_jsonl([{"context": f"d{i}", "target": f"x {i}"} for i in range(4)], "dev.jsonl")
    original, fired = LabelledLossTrainer._without_repeats, []

    def batch(self, inputs):  # each evaluation batch passes here on its way to the model
        if self.state.global_step == 2:
            fired.append(2)
            raise torch.OutOfMemoryError(CUDA_MESSAGE)
        return original(self, inputs)

    monkeypatch.setattr(LabelledLossTrainer, "_without_repeats", batch)
    out = tmp_path / "run"
    assert train(tiny_model_dir, out, rows, f"dev_file={dev}", "eval_steps=2", "eval_on_start=false",
                 "eval_batch_size=2", "cutoff_len=256", "max_source_length=100", save_steps=1) == 2
    assert fired == [2]
    assert last_error(capsys) == (
        "glmtune: error: out of memory on the GPU while evaluating at step 2 of 4: lower eval_batch_size (2), "
        "cutoff_len (256), max_source_length (100), set quantization_bit 4 (now full weights); the last complete "
        f"checkpoint is {out / 'checkpoint-1'} (continue from it with --resume and the lowered values)")


def test_out_of_memory_before_any_checkpoint_says_so(tiny_model_dir, tmp_path, rows, out_of_memory_in, capsys):
    fired = out_of_memory_in(1, MemoryError())
    out = tmp_path / "run"
    assert train(tiny_model_dir, out, rows, "batch_size=1", "gradient_checkpointing=true") == 2
    assert fired == [1]
    assert last_error(capsys) == (
        "glmtune: error: out of memory on the CPU (the machine's RAM) at step 1 of 4 while training: lower "
        "cutoff_len (1024); no checkpoint was saved before it (save_steps 2); start again with --overwrite")


# -- predict and eval -------------------------------------------------------------------------------------


@pytest.fixture
def failing_batch(monkeypatch):
    """failing_batch(n) -> counter: the n-th batch answered (1-based) runs out of GPU memory."""

    def install(n):
        original = Generator._new_tokens
        calls = []

        def new_tokens(self, conversations, sampling, tools=None):
            calls.append(len(conversations))
            if len(calls) == n:
                raise torch.OutOfMemoryError(CUDA_MESSAGE)
            return original(self, conversations, sampling, tools)

        monkeypatch.setattr(Generator, "_new_tokens", new_tokens)
        return calls

    return install


def test_eval_out_of_memory_keeps_the_rows_written_and_continues(tiny_model_dir, tmp_path, write_jsonl,
                                                                 failing_batch, monkeypatch, capsys):
    data = write_jsonl([{"context": f"question {i}", "target": f"answer {i}"} for i in range(6)], "eval.jsonl")
    out = tmp_path / "eval"
    command = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
               "--max-new-tokens", "4", "--template", "plain"]
    calls = failing_batch(2)
    assert main([*command, "--batch-size", "2"]) == 2
    assert calls == [2, 2]
    assert last_error(capsys) == (
        "glmtune: error: out of memory on the GPU answering rows 3-4 of 6: lower --batch-size (2) or "
        "--max-new-tokens (4), cut long prompts with --max-source-length, load the base with --quantization-bit 4 "
        "(now full weights); the 2 answers written so far are kept: run the same command again (with a lower "
        "--batch-size) to continue; a new --max-new-tokens, --max-source-length or --quantization-bit changes the "
        "answers: start over with --overwrite")
    kept = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["context"] for line in kept] == ["question 0", "question 1"]
    monkeypatch.undo()
    assert main([*command, "--batch-size", "1"]) == 0  # continues with a lower batch size
    rows = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert rows[:2] == kept and [json.loads(line)["context"] for line in rows] == [f"question {i}" for i in range(6)]


def test_predict_out_of_memory_writes_nothing(tiny_model_dir, tmp_path, write_jsonl, failing_batch, capsys):
    data = write_jsonl([{"prompt": f"question {i}"} for i in range(3)], "in.jsonl")
    output = tmp_path / "predictions.jsonl"
    calls = failing_batch(2)
    assert main(["predict", "--model", str(tiny_model_dir), "--input", str(data), "--output", str(output),
                 "--batch-size", "1", "--max-new-tokens", "3", "--max-source-length", "50", "--quantization-bit", "0",
                 "--template", "plain"]) == 2
    assert calls == [1, 1]
    assert last_error(capsys) == (
        "glmtune: error: out of memory on the GPU answering row 2 of 3: lower --max-new-tokens (3), lower "
        "--max-source-length (50), load the base with --quantization-bit 4 (now full weights); nothing was written")
    assert not output.exists()


# -- serving ----------------------------------------------------------------------------------------------


@pytest.fixture
def engine(tiny_model_dir):
    from glmtune.models.loader import load_model

    engine = ChatEngine(Generator(load_model(str(tiny_model_dir)), "plain"),
                        generation=GenerationOptions(max_new_tokens=8))
    yield engine
    engine.close()


def fail_once(model, error):
    """The model's next forward raises `error`; returns the counter of failures."""
    real = model.forward
    fired = []

    def forward(*args, **kwargs):
        if not fired:
            fired.append(1)
            raise error
        return real(*args, **kwargs)

    model.forward = forward
    return fired


def test_a_request_that_runs_out_of_memory_fails_alone_and_the_next_is_answered(engine):
    fired = fail_once(engine.generator.loaded.model, torch.OutOfMemoryError(CUDA_MESSAGE))
    request = ChatRequest([Message("user", "hi")], GenerationOptions(max_new_tokens=6))
    prompt = len(engine.prepare(request, print).prompt_ids)
    events = list(engine.stream(request))
    assert fired == [1]
    assert events == [Failed(
        f"out of memory on the GPU answering this request (a {prompt}-token prompt, up to 6 new tokens): ask for "
        "fewer new tokens (max_tokens; --max-new-tokens in glmtune chat) or send a shorter conversation; a base "
        "loaded with --quantization-bit 4 needs less memory")]
    events = list(engine.stream(ChatRequest([Message("user", "hi")], GenerationOptions(max_new_tokens=3))))
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens <= 3 and engine.answered == 1


def test_chat_reports_out_of_memory_on_one_line_and_goes_on_without_that_turn(engine):
    import io

    from glmtune.serve.chat import chat_loop

    fired = fail_once(engine.generator.loaded.model, RuntimeError(CPU_MESSAGE))
    asked = []
    real_stream = engine.stream

    def stream(request, cancel=None):
        asked.append([m.content for m in request.messages])
        return real_stream(request, cancel)

    engine.stream = stream
    typed = iter(["first question", "second question", "exit"])
    out = io.StringIO()
    assert chat_loop(engine, generation=GenerationOptions(max_new_tokens=5), read=lambda prompt: next(typed),
                     out=out) == 2
    assert fired == [1]
    errors = [line for line in out.getvalue().splitlines() if "(error:" in line]
    assert errors == ["(error: out of memory on the CPU (the machine's RAM) answering this request (a "
                      f"{len(engine.prepare(ChatRequest([Message('user', 'first question')]), print).prompt_ids)}"
                      "-token prompt, up to 5 new tokens): ask for fewer new tokens (max_tokens; --max-new-tokens in "
                      "glmtune chat) or send a shorter conversation)"]
    assert asked == [["first question"], ["second question"]]  # the failed turn is not sent again


# -- the CLI's last resort --------------------------------------------------------------------------------


@pytest.mark.parametrize("error, device", [(torch.OutOfMemoryError(CUDA_MESSAGE), "the GPU"),
                                           (MemoryError(), "the CPU (the machine's RAM)")])
def test_out_of_memory_anywhere_else_is_one_line_and_exit_2(monkeypatch, capsys, error, device):
    import glmtune.cli

    def run(args):
        raise error

    monkeypatch.setattr(glmtune.cli, "_cmd_metrics", run)
    assert main(["metrics", "--predictions", "predictions.jsonl"]) == 2
    err = capsys.readouterr().err
    detail = f" ({CUDA_MESSAGE})" if str(error) else ""
    assert err == (f"glmtune: error: out of memory on {device} in glmtune metrics{detail}: lower the batch size "
                   "(batch_size, --batch-size), the sequence length (cutoff_len) or the answer length "
                   "(--max-new-tokens), turn on gradient_checkpointing when training, or load the base with 4-bit "
                   "weights (quantization_bit 4, --quantization-bit 4)\n")
    monkeypatch.setattr(glmtune.cli, "_cmd_metrics", lambda args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # any other error is a bug and keeps its traceback
        main(["metrics", "--predictions", "predictions.jsonl"])


def test_the_cli_imports_no_torch_to_recognise_out_of_memory():
    code = "import sys, glmtune.cli, glmtune.oom; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_reported_passes_other_errors_and_turns_out_of_memory_into_one_error():
    from glmtune.oom import reported

    with pytest.raises(GlmtuneError, match="^lower it: CUDA out of memory"):
        with reported(lambda e: f"lower it: {str(e)[:19]}"):
            raise torch.OutOfMemoryError(CUDA_MESSAGE)
    with pytest.raises(ValueError):
        with reported(lambda e: "never"):
            raise ValueError("out of memory")
