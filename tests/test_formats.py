import json

import pytest

from glmtune.data.formats import load_samples, read_records
from glmtune.errors import GlmtuneError


def roles(sample):
    return [(m.role, m.content, m.trainable) for m in sample.messages]


def test_context_target(write_jsonl):
    samples, fmt = load_samples(write_jsonl([{"context": "问题", "target": "答案"}]))
    assert fmt.name == "context/target"
    assert roles(samples[0]) == [("user", "问题", True), ("assistant", "答案", True)]
    assert samples[0].where.endswith(":1")


def test_alpaca_with_input_system_and_history(write_jsonl):
    row = {"instruction": "翻译", "input": "hello", "output": "你好", "system": "你是翻译",
           "history": [["早上好", "good morning"]]}
    samples, fmt = load_samples(write_jsonl([row]))
    assert fmt.name == "alpaca"
    assert roles(samples[0]) == [("system", "你是翻译", True), ("user", "早上好", True),
                                 ("assistant", "good morning", False), ("user", "翻译\nhello", True),
                                 ("assistant", "你好", True)]


def test_named_columns(write_jsonl):
    path = write_jsonl([{"content": "类型#裙", "summary": "一条裙子", "extra": 1}])
    samples, fmt = load_samples(path, prompt_column="content", response_column="summary")
    assert fmt.name == "columns"
    assert roles(samples[0])[-2:] == [("user", "类型#裙", True), ("assistant", "一条裙子", True)]
    with pytest.raises(GlmtuneError, match="give both"):
        load_samples(path, prompt_column="content")


def test_prompt_response_with_history(write_jsonl):
    samples, fmt = load_samples(write_jsonl([{"prompt": "b", "response": "B", "history": [["a", "A"]]}]))
    assert fmt.name == "prompt/response"
    assert [m.trainable for m in samples[0].messages if m.role == "assistant"] == [False, True]


def test_messages_and_sharegpt_conversations(write_jsonl):
    messages = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                             {"role": "assistant", "content": "a2"}]}
    samples, _ = load_samples(write_jsonl([messages]))
    assert [m.role for m in samples[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert all(m.trainable for m in samples[0].messages)
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    samples, fmt = load_samples(write_jsonl([sharegpt], "sharegpt.jsonl"))
    assert fmt.name == "conversations" and roles(samples[0]) == [("user", "q", True), ("assistant", "a", True)]


def test_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"context": "a", "target": "b"},\n\n  {"context": "c",\n   "target": ""}\n]\n')
    with pytest.raises(GlmtuneError) as error:
        load_samples(path)
    assert f"{path}:4: field 'target' is empty" in str(error.value)
    records = read_records(path)
    assert [line for line, _ in records] == [2, 4]


def test_blank_lines_and_bom_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    rows = [json.dumps({"context": f"q{i}", "target": f"a{i}"}) for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + ("\n\n".join(rows) + "\n\n").encode())
    samples, _ = load_samples(path)
    assert len(samples) == 3
    assert [s.where.rsplit(":", 1)[1] for s in samples] == ["1", "3", "5"]


def test_every_bad_line_is_reported_with_file_and_line(write_jsonl):
    path = write_jsonl([
        {"context": "ok", "target": "ok"},
        '{"context": "broken", "target": ',
        {"context": "no target"},
        {"context": 5, "target": "x"},
        {"context": "q", "target": "   "},
        "[1, 2]",
        {"context": "ok", "target": "ok"},
    ])
    with pytest.raises(GlmtuneError) as error:
        load_samples(path)
    message = str(error.value)
    assert "5 problems" in message
    assert f"{path}:2: invalid JSON" in message
    assert f"{path}:3: missing field 'target'" in message
    assert f"{path}:4: field 'context' must be a string, got int" in message
    assert f"{path}:5: field 'target' is empty" in message
    assert f"{path}:6: each record must be a JSON object, got list" in message
    assert ":1:" not in message and ":7:" not in message


def test_non_utf8_and_empty_files(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"context": "ok", "target": "ok"}\n{"context": "caf\xe9", "target": "x"}\n')
    with pytest.raises(GlmtuneError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_samples(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(GlmtuneError, match="empty"):
        load_samples(empty)
    with pytest.raises(GlmtuneError, match="not found"):
        load_samples(tmp_path / "missing.jsonl")


def test_conversation_problems(write_jsonl):
    path = write_jsonl([
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},
        {"messages": [{"role": "wizard", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    ])
    with pytest.raises(GlmtuneError) as error:
        load_samples(path)
    message = str(error.value)
    assert ":1: messages[1]: expected an assistant message" in message
    assert ":2: messages[0]: unknown role 'wizard'" in message
    assert ":3: 'messages' must end with an assistant message" in message
    assert ":4: field 'messages' must be a non-empty list" in message
    assert ":5: messages[1]: empty assistant answer" in message


def test_bad_history(write_jsonl):
    with pytest.raises(GlmtuneError, match=r":1: history\[0\] must be a \[question, answer\] pair"):
        load_samples(write_jsonl([{"prompt": "q", "response": "a", "history": [["only one"]]}]))


def test_prediction_inputs_need_no_answer(write_jsonl):
    path = write_jsonl([{"context": "q1"}, {"context": "q2", "target": ""}, {"context": "q3", "target": "a3"}])
    samples, _ = load_samples(path, require_answer=False)
    assert [s.reference for s in samples] == [None, None, "a3"]
    assert [m.content for m in samples[2].prompt_messages] == ["q3"]
    with pytest.raises(GlmtuneError, match="missing field 'target'"):
        load_samples(path)


def test_unknown_shape_names_the_formats(write_jsonl):
    with pytest.raises(GlmtuneError, match=r":1: cannot tell the format.*--prompt-column"):
        load_samples(write_jsonl([{"question": "q", "answer": "a"}]))
