"""prompt_template: a row's prompt written from its fields, the same way in train, predict, eval, chat and serve."""

from __future__ import annotations

import json

import pytest

from glmtune.cli import main
from glmtune.config import TrainConfig, build_config
from glmtune.data.formats import Message, load_samples
from glmtune.data.preprocess import Encoder, LengthLimits
from glmtune.data.prompt_template import fill_message, fill_row, template_fields
from glmtune.data.templates import get_template
from glmtune.errors import GlmtuneError

ALPACA = "问：{instruction}\n补充信息：{input}\n答："
ROWS = [{"instruction": "把句子译成英文", "input": "你好", "output": "Hello"},
        {"instruction": "讲个笑话", "input": "", "output": "好的"}]


def test_the_row_fields_fill_the_user_message_and_the_answer_stays(write_jsonl):
    samples, fmt = load_samples(write_jsonl(ROWS), prompt_template=ALPACA)
    assert fmt.name == "alpaca"
    assert [m.content for m in samples[0].messages] == ["问：把句子译成英文\n补充信息：你好\n答：", "Hello"]
    # an empty field renders empty: the line stays (the rule is plain, docs/data.md)
    assert samples[1].messages[0].content == "问：讲个笑话\n补充信息：\n答："
    assert samples[1].reference == "好的"


def test_literal_braces_escapes_null_and_numbers():
    assert fill_row("{{json}} {q}", {"q": "x"}) == ("{json} x", None)
    # \n written as two characters (a shell, single-quoted YAML) is a newline; \\ is one backslash
    assert fill_row(r"Q:{q}\nA:\\n", {"q": "x"}) == ("Q:x\nA:\\n", None)
    assert fill_row("{a}|{b}|{c}|{d}", {"a": None, "b": 3, "c": True, "d": "t"}) == ("|3|true|t", None)
    assert fill_row("{a}", {"a": ["x"]})[1] == "field 'a' used by prompt_template must be text, a number or null, got list"
    assert template_fields("{a}{b}{a}") == ["a", "b"]


def test_train_and_predict_see_the_same_prompt_ids(tokenizer, write_jsonl):
    for name in ("plain", "auto"):
        encoder = Encoder(tokenizer, get_template(name, tokenizer, "llama"), {tokenizer.eos_token_id})
        train, _ = load_samples(write_jsonl(ROWS), prompt_template=ALPACA)
        predict, _ = load_samples(write_jsonl([{k: v for k, v in r.items() if k != "output"} for r in ROWS],
                                              "predict.jsonl"), prompt_template=ALPACA, require_answer=False)
        for trained, asked in zip(train, predict):
            features, _ = encoder.encode(trained, LengthLimits(cutoff_len=512))
            masked = [i for i, label in zip(features["input_ids"], features["labels"]) if label == -100]
            ids, _ = encoder.prompt_ids(asked.prompt_messages)
            assert masked == ids
            # and they are the filled text's ids, not the bare instruction's
            assert ids == encoder.prompt_ids([Message("user", fill_row(ALPACA, trained.row)[0])])[0]
            assert ids != encoder.prompt_ids([Message("user", trained.row["instruction"])])[0]


def test_a_row_without_a_field_is_a_file_line_error(write_jsonl):
    path = write_jsonl([ROWS[0], {"instruction": "x", "output": "y"}])
    with pytest.raises(GlmtuneError) as e:
        load_samples(path, prompt_template=ALPACA)
    assert str(e.value) == (f"{path}:2: prompt_template needs field 'input', which this row lacks "
                            "(its fields: ['instruction', 'output'])")


def test_the_template_writes_the_prompt_so_only_the_answer_column_is_needed(write_jsonl):
    path = write_jsonl([{"标题": "春", "关键词": "花", "summary": "春天来了"}])
    samples, _ = load_samples(path, response_column="summary", prompt_template="{标题}：{关键词}")
    assert [m.content for m in samples[0].messages] == ["春：花", "春天来了"]


def test_history_stays_as_written_and_conversations_are_refused(write_jsonl):
    rows = [{"context": "c2", "target": "t2", "history": [["q1", "a1"]]}]
    samples, _ = load_samples(write_jsonl(rows), prompt_template="问：{context}")
    assert [m.content for m in samples[0].messages] == ["q1", "a1", "问：c2", "t2"]
    path = write_jsonl([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(GlmtuneError, match=r"data.jsonl:1: prompt_template fills single-turn rows .* leave "
                                           "prompt_template unset"):
        load_samples(path, prompt_template="{content}")


@pytest.mark.parametrize("template, says", [
    ("问：{instruction", "is not a valid template"),
    ("{} and {0}", "{} and {0} are not allowed"),
    ("{a.b}", "not a plain column name"),
    ("{a!r}", "format spec or conversion"),
])
def test_a_bad_template_is_one_line_at_config_time(template, says):
    with pytest.raises(GlmtuneError) as e:
        build_config(TrainConfig, [("run.yaml", {"prompt_template": template})])
    assert str(e.value).startswith("run.yaml: prompt_template ") and says in str(e.value)
    assert "\n" not in str(e.value)


def test_a_bad_template_on_the_command_line_stops_before_loading(write_jsonl, tmp_path, capsys):
    code = main(["predict", "--input", str(write_jsonl(ROWS)), "--output", str(tmp_path / "p.jsonl"),
                 "--prompt-template", "{instruction"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("glmtune: error: --prompt-template '{instruction' is not a valid")
    assert len(err.splitlines()) == 1 and not (tmp_path / "p.jsonl").exists()


def test_chat_fills_the_one_field_and_refuses_several(tiny_model_dir, capsys):
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model
    from glmtune.serve.engine import ChatEngine, ChatRequest

    assert fill_message("问：{query}\n答：", "你好 {x}") == "问：你好 {x}\n答："
    engine = ChatEngine(Generator(load_model(str(tiny_model_dir)), "plain"), prompt_template="问：{query}\n答：")
    try:
        history = [Message("user", "早"), Message("assistant", "早上好")]
        job = engine.prepare(ChatRequest(history + [Message("user", "你好")]), print)
        # only the newest message is filled, as training fills a row's own question and keeps its history
        expected = engine.generator.encoder.prompt_ids(history + [Message("user", "问：你好\n答：")])[0]
        assert job.prompt_ids == expected
    finally:
        engine.close()
    with pytest.raises(GlmtuneError, match="has the fields {a}, {b}; chat, serve and webui fill exactly one"):
        ChatEngine(engine.generator, prompt_template="{a}{b}")
    for command in (["chat"], ["serve", "--port", "0"]):  # refused before any model loads or port is bound
        assert main(command + ["--model", "/nonexistent", "--prompt-template", "{a}{b}"]) == 2
        assert "--prompt-template '{a}{b}' has the fields {a}, {b}" in capsys.readouterr().err


TRAINED_WITH = r"问：{instruction}\n答："  # as typed in a shell: \n is two characters


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, train_tiny, tmp_path_factory):
    """(adapter folder, data file) of a one-step run trained with TRAINED_WITH."""
    folder = tmp_path_factory.mktemp("prompt-template")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS * 2), encoding="utf-8")
    result = train_tiny(tiny_model_dir, (data, None), folder / "run", max_steps=1, batch_size=2,
                        prompt_template=TRAINED_WITH)
    return result.adapter_dir, data


@pytest.fixture
def asked(monkeypatch):
    """The last user message of every prompt built for generation."""
    from glmtune.data import preprocess

    seen, real = [], preprocess.Encoder.prompt_ids

    def spy(self, messages, limits=None, tools=None):
        seen.append(messages[-1].content)
        return real(self, messages, limits, tools)

    monkeypatch.setattr(preprocess.Encoder, "prompt_ids", spy)
    return seen


def test_the_adapter_records_it_and_predict_uses_it_without_the_flag(tuned, asked, tmp_path, capsys):
    import yaml

    adapter, data = tuned
    info = json.loads((adapter / "glmtune_adapter.json").read_text(encoding="utf-8"))
    assert info["prompt_template"] == TRAINED_WITH
    resolved = yaml.safe_load((adapter.parent / "resolved_config.yaml").read_text(encoding="utf-8"))
    assert resolved["prompt_template"] == TRAINED_WITH
    for extra, first in (([], "问：把句子译成英文\n答："), (["--prompt-template", ""], "把句子译成英文\n你好"),
                         (["--prompt-template", "Q: {input}"], "Q: 你好")):
        asked.clear()
        out = tmp_path / f"p{len(asked)}{len(extra)}.jsonl"
        assert main(["predict", "--adapter", str(adapter), "--input", str(data), "--output", str(out),
                     "--max-new-tokens", "2", "--overwrite", *extra]) == 0, capsys.readouterr().err
        assert asked[0] == first and len(set(asked)) == len(ROWS)  # (lengths are checked first, then generated)


def test_eval_and_compare_use_the_adapters_template_for_base_and_tuned(tuned, asked, tmp_path, capsys):
    adapter, data = tuned
    assert main(["eval", "--adapter", str(adapter), "--data", str(data), "--output", str(tmp_path / "eval"),
                 "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    assert set(asked) == {"问：把句子译成英文\n答：", "问：讲个笑话\n答："}
    asked.clear()
    assert main(["compare", "--adapter", str(adapter), "--data", str(data), "--output", str(tmp_path / "cmp"),
                 "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    assert set(asked) == {"问：把句子译成英文\n答：", "问：讲个笑话\n答："}  # base and tuned alike
    assert json.loads((tmp_path / "cmp" / "base" / "eval_config.json").read_text(encoding="utf-8"))[
        "prompt_template"] == TRAINED_WITH


def test_data_validate_checks_a_file_against_a_template(write_jsonl, capsys):
    path = write_jsonl(ROWS)
    assert main(["data", "validate", str(path), "--prompt-template", "{instruction}{input}"]) == 0
    assert main(["data", "validate", str(path), "--prompt-template", "{instruction}{question}"]) == 2
    assert "data.jsonl:1: prompt_template needs field 'question'" in capsys.readouterr().err
