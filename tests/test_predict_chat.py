import io
import json
import os
import subprocess
import sys

import pytest

from glmtune.cli import main
from glmtune.data.formats import Message
from glmtune.serve.chat import chat_loop


def test_predict_writes_each_row_plus_its_prediction(trained_run, write_jsonl, tmp_path, capsys):
    rows = [{"context": "Instruction: 请按要求回答。\nInput: 抽取三元组：\n\n张三出生于上海。\nAnswer: ", "target": "x", "id": 1},
            {"context": "这条评论说的是什么？", "id": 2},
            {"context": "你好", "target": "", "id": 3}]
    source = write_jsonl(rows, "in.jsonl")
    out = tmp_path / "out.jsonl"
    args = ["predict", "--adapter", str(trained_run.adapter_dir), "--input", str(source), "--output", str(out),
            "--batch-size", "2", "--max-new-tokens", "8"]
    assert main(args) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in written] == rows
    assert all(isinstance(r["prediction"], str) for r in written)
    assert main(args) == 2  # never overwrites without being asked
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == written  # greedy: same answers


def test_predict_rejects_bad_input_before_loading(tmp_path, write_jsonl, capsys):
    bad = write_jsonl(['{"context": '], "bad.jsonl")
    assert main(["predict", "--model", "/nowhere", "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err


class EchoEngine:
    """Stands in for ChatEngine: answers with the number of messages it was given, in two pieces."""

    def __init__(self, fail_when=None):
        self.seen, self.requests, self.fail_when = [], [], fail_when

    def stream(self, request):
        from glmtune.serve.engine import BadRequest, Finished

        if self.fail_when and self.fail_when in request.messages[-1].content:
            raise BadRequest("the prompt is 9000 tokens, but this model's context is 8192 tokens")
        self.seen.append(list(request.messages))
        self.requests.append(request)
        yield "seen "
        yield str(len(request.messages))
        text = request.messages[-1].content
        if "long" in text:  # cut by max_tokens
            yield Finished(10, request.generation.max_new_tokens, "length")
        elif "full" in text:  # cut earlier: the engine shortened it to what the context had left
            yield Finished(10, 2, "length")
        else:
            yield Finished(10, 2, "stop")


def run_chat(lines, engine=None, **kwargs):
    generator, out = engine or EchoEngine(), io.StringIO()
    feed = iter(lines)

    def read(prompt):
        out.write(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    answered = chat_loop(generator, read=read, out=out, **kwargs)
    return generator, out.getvalue(), answered


def test_chat_keeps_history_until_cleared():
    generator, text, answered = run_chat(["你好", "再说一遍", "clear", "新话题", "exit", "never read"])
    assert answered == 3
    assert [len(m) for m in generator.seen] == [1, 3, 1]
    assert generator.seen[1][1] == Message("assistant", "seen 1")
    assert "assistant> seen 1" in text and "(conversation cleared)" in text


def test_chat_without_history_and_with_a_system_prompt():
    generator, _, answered = run_chat(["一", "二", ""], keep_history=False, system="你是助手")
    assert answered == 2  # the blank line is ignored, end of input leaves
    assert [[m.role for m in messages] for messages in generator.seen] == [["system", "user"], ["system", "user"]]


def test_chat_reports_cut_answers_and_errors_and_goes_on():
    from glmtune.config import GenerationOptions

    engine = EchoEngine(fail_when="huge")
    _, text, answered = run_chat(["a long one", "huge text", "after", "context full"], engine=engine,
                                 generation=GenerationOptions(max_new_tokens=7, temperature=0.5, top_p=0.9))
    assert answered == 3
    assert "(cut at 7 tokens; --max-new-tokens allows longer answers)" in text
    assert "(cut at 2 tokens: the conversation fills the model's context; type clear to start over)" in text
    assert "(error: the prompt is 9000 tokens, but this model's context is 8192 tokens; type clear to start over)" in text
    assert [len(m) for m in engine.seen] == [1, 3, 5]  # the failed message did not enter the history
    request = engine.requests[0]
    options = request.generation
    assert (options.max_new_tokens, options.temperature, options.top_p, request.fit_context) == (7, 0.5, 0.9, True)


def test_a_long_conversation_gets_a_shortened_answer_not_an_error(tiny_model_dir):
    """The terminal chat asks for --max-new-tokens but takes what the context has left, as serve does for a
    request without max_tokens; only a prompt that fills the context alone is refused."""
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model
    from glmtune.serve.engine import BadRequest, ChatEngine, ChatRequest

    engine = ChatEngine(Generator(load_model(str(tiny_model_dir)), "plain"),
                        generation=GenerationOptions(max_new_tokens=50))
    try:
        limit = engine.context_length
        long_turn = "word " * (limit - 40)
        history = [Message("user", long_turn), Message("assistant", "ok")]
        prompt_tokens = len(engine.generator.encoder.prompt_ids(history + [Message("user", "more")])[0])
        room = limit - prompt_tokens
        assert 0 < room < 50  # the setting this test is about: less room than --max-new-tokens asks for
        strict = ChatRequest(history + [Message("user", "more")], GenerationOptions(max_new_tokens=50))
        with pytest.raises(BadRequest, match="max_tokens is 50"):  # an API client asking for 50 is refused
            engine.prepare(strict, lambda event: None)
        job = engine.prepare(ChatRequest(strict.messages, GenerationOptions(max_new_tokens=50), fit_context=True),
                             lambda event: None)
        assert job.generation.max_new_tokens == room

        _, text, answered = run_chat([long_turn + "ok more", "exit"], engine=engine,
                                     generation=GenerationOptions(max_new_tokens=50))
        assert answered == 1 and "(error" not in text and "assistant> " in text
    finally:
        engine.close()


def test_chat_command_streams_answers_from_a_terminal_session(trained_run):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-m", "glmtune", "chat", "--adapter", str(trained_run.adapter_dir),
                             "--max-new-tokens", "4"], input="你好\nclear\n再见\nexit\n", capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
    assert "(conversation cleared)" in result.stdout
    assert "Traceback" not in result.stderr
