"""Tool conversations and train_on: reading the three data formats, the ChatGLM3 and GLM-4 layouts token for
token against the official fine-tuning scripts, and which tokens train under each train_on in every family."""

import json
from pathlib import Path

import pytest

from glmtune.data.formats import load_samples
from glmtune.data.messages import ToolCall
from glmtune.data.preprocess import IGNORE_INDEX, Encoder, LengthLimits, encode_samples
from glmtune.data.templates import get_template
from glmtune.data.tool_format import parse_python_call, parse_tool_call
from glmtune.errors import GlmtuneError
from glmtune.families import family_facts

WEATHER = {"name": "get_weather", "description": "查询城市天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS_OPENAI = [{"type": "function", "function": WEATHER}]

# One conversation, two calls (one after a thought, one alone) and two user turns, in each data format.
CHATGLM3_ITEM = {"tools": [WEATHER], "conversations": [
    {"role": "system", "content": "你是出行助手。"},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "content": "我来查一下。"},
    {"role": "tool", "name": "get_weather", "parameters": {"city": "北京", "days": 2, "hourly": True},
     "observation": {"temp": 21, "sky": "晴"}},
    {"role": "assistant", "content": "北京今天晴，21度。"},
    {"role": "user", "content": "上海呢？"},
    {"role": "tool", "name": "get_weather", "parameters": {"city": "上海"}, "observation": "25度，多云"},
    {"role": "assistant", "content": "上海25度，多云。"},
]}
OPENAI_ROW = {"tools": TOOLS_OPENAI, "messages": [
    {"role": "system", "content": "你是出行助手。"},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "content": "我来查一下。", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "北京", "days": 2, "hourly": True})}}]},
    {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temp": 21, "sky": "晴"}, ensure_ascii=False)},
    {"role": "assistant", "content": "北京今天晴，21度。"},
    {"role": "user", "content": "上海呢？"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c2", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "上海"}}}]},
    {"role": "tool", "tool_call_id": "c2", "content": "25度，多云"},
    {"role": "assistant", "content": "上海25度，多云。"},
]}
GLM4_MESSAGES = [
    {"role": "system", "content": "你是出行助手。", "tools": TOOLS_OPENAI},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "content": "我来查一下。"},
    {"role": "assistant", "metadata": "get_weather", "content": json.dumps({"city": "北京", "days": 2, "hourly": True},
                                                                          ensure_ascii=False)},
    {"role": "observation", "content": json.dumps({"temp": 21, "sky": "晴"}, ensure_ascii=False)},
    {"role": "assistant", "content": "北京今天晴，21度。"},
    {"role": "user", "content": "上海呢？"},
    {"role": "assistant", "metadata": "get_weather", "content": json.dumps({"city": "上海"}, ensure_ascii=False)},
    {"role": "observation", "content": "25度，多云"},
    {"role": "assistant", "content": "上海25度，多云。"},
]


def _one(write_jsonl, row, name="data.jsonl"):
    samples, _ = load_samples(write_jsonl([row], name))
    return samples[0]


def test_the_three_formats_read_into_the_same_conversation(write_jsonl):
    chatglm3 = _one(write_jsonl, CHATGLM3_ITEM, "a.jsonl")
    openai = _one(write_jsonl, OPENAI_ROW, "b.jsonl")
    glm4 = _one(write_jsonl, {"messages": GLM4_MESSAGES}, "c.jsonl")  # the thought and the call: one turn
    roles = ["system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "assistant"]
    for sample in (chatglm3, openai, glm4):
        assert [m.role for m in sample.messages] == roles
        calls = [c for m in sample.messages for c in m.tool_calls]
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "北京", "days": 2, "hourly": True}),
                                                          ("get_weather", {"city": "上海"})]
        assert json.loads(sample.messages[3].content) == {"temp": 21, "sky": "晴"}
    assert chatglm3.messages[2].content == openai.messages[2].content == glm4.messages[2].content == "我来查一下。"
    assert chatglm3.tools == [WEATHER] and openai.tools == glm4.tools == TOOLS_OPENAI
    assert [c.id for m in openai.messages for c in m.tool_calls] == ["c1", "c2"]
    assert openai.messages[3].tool_call_id == "c1"


def test_sharegpt_function_call_and_observation_turns(write_jsonl):
    sample = _one(write_jsonl, {"conversations": [
        {"from": "human", "value": "北京天气"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "北京"}})},
        {"from": "observation", "value": "晴"},
        {"from": "gpt", "value": "晴天。"}]})
    assert [m.role for m in sample.messages] == ["user", "assistant", "tool", "assistant"]
    assert sample.messages[1].tool_calls == [ToolCall("get_weather", {"city": "北京"})]


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     r"messages\[1\]\.tool_calls\[0\]: a tool call needs the tool's name"),
    ([{"role": "user", "content": "q"}, {"role": "wizard", "content": "x"}], r"messages\[1\]: unknown role 'wizard'"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}],
     r"messages\[1\]: a tool result with no tool call before it"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{city: 1}"}}]}], r"messages\[1\]\.tool_calls\[0\]: the arguments are not valid JSON"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1, 2]"}}]}], r"messages\[1\]\.tool_calls\[0\]: the arguments must be a JSON object"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "b", "content": "r"}],
     r"messages\[2\]: tool_call_id 'b' matches no call before it"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}, {"role": "user", "content": "again"}],
     r"messages\[2\]: 1 tool call\(s\) before this message have no tool result"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "r"},
      {"role": "tool", "content": "r2"}], r"messages\[3\]: more tool results than the 1 call\(s\)"),
])
def test_malformed_tool_conversations_are_named_by_file_line_and_message(write_jsonl, messages, problem):
    path = write_jsonl([{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]},
                        {"messages": messages + [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(GlmtuneError, match=f"data.jsonl:2: {problem}"):
        load_samples(path)


def test_chatglm3_parameters_must_be_an_object_and_tools_a_list(write_jsonl):
    path = write_jsonl([{"tools": {"name": "x"}, "conversations": [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": "a"}]},
                        {"conversations": [{"role": "user", "content": "q"},
                                           {"role": "tool", "name": "f", "parameters": "city=1", "observation": "r"},
                                           {"role": "assistant", "content": "a"}]}])
    with pytest.raises(GlmtuneError) as error:
        load_samples(path)
    assert "data.jsonl:1: tools must be a list of tool objects" in str(error.value)
    assert "data.jsonl:2: conversations[1]: the arguments are not valid JSON" in str(error.value)


@pytest.fixture(scope="module")
def chatglm3_tokenizer(tmp_path_factory):
    import shutil

    from conftest import chatglm_tokenizer_dir

    from glmtune.models.chatglm2.tokenization import load_chatglm2_tokenizer

    source = chatglm_tokenizer_dir("chatglm2-6b")
    folder = tmp_path_factory.mktemp("chatglm3-tokenizer")
    shutil.copy(source / "tokenizer.model", folder)
    shutil.copy(source / "tokenizer_config.chatglm3.json", folder / "tokenizer_config.json")
    return load_chatglm2_tokenizer(folder, "chatglm3")


def _encoder(tokenizer, family, template="auto", train_on="all_assistant"):
    from glmtune.models.loader import stop_token_ids

    stops = stop_token_ids(tokenizer) | {tokenizer.convert_tokens_to_ids(t) for t in family_facts(family).stop_tokens}
    return Encoder(tokenizer, get_template(template, tokenizer, family), stops, train_on=train_on)


def test_chatglm3_tool_conversation_equals_the_official_fine_tuning_example(write_jsonl, chatglm3_tokenizer):
    from tool_oracles import chatglm3_official_tool_example

    official = chatglm3_official_tool_example(chatglm3_tokenizer, CHATGLM3_ITEM)
    encoder = _encoder(chatglm3_tokenizer, "chatglm3")
    for row in (CHATGLM3_ITEM, OPENAI_ROW):  # OpenAI's data, given ChatGLM3's tool list, lays out the same
        row = {**row, "tools": [WEATHER]}
        features, _ = encode_samples([_one(write_jsonl, row)], encoder, LengthLimits(), progress=False)
        assert features[0]["input_ids"] == official["input_ids"]
        assert features[0]["labels"] == official["labels"]
    trained = [t for t in official["labels"] if t != IGNORE_INDEX]
    assert trained.count(chatglm3_tokenizer.get_command("<|observation|>")) == 2  # each call ends at the result
    assert "tool_call(city='北京', days=2, hourly=True)" in chatglm3_tokenizer.decode(trained)


def test_chatglm3_prompt_with_tools_equals_build_chat_input(write_jsonl, chatglm3_tokenizer):
    from tool_oracles import CHATGLM3_INTRO

    sample = _one(write_jsonl, CHATGLM3_ITEM)
    encoder = _encoder(chatglm3_tokenizer, "chatglm3")
    ids, _ = encoder.prompt_ids(sample.messages[:6], tools=sample.tools)  # asking about 上海
    history = [{"role": "system", "content": CHATGLM3_INTRO.rstrip("\n"), "tools": [WEATHER]},
               {"role": "system", "content": "你是出行助手。"}, {"role": "user", "content": "北京天气怎么样？"},
               {"role": "assistant", "metadata": "", "content": "我来查一下。"},
               {"role": "assistant", "metadata": "get_weather",
                "content": "```python\ntool_call(city='北京', days=2, hourly=True)\n```"},
               {"role": "observation", "content": json.dumps({"temp": 21, "sky": "晴"}, ensure_ascii=False)},
               {"role": "assistant", "content": "北京今天晴，21度。"}]
    official = chatglm3_tokenizer.build_chat_input("上海呢？", history=history)["input_ids"][0].tolist()
    assert ids == official


def test_glm4_tool_conversation_equals_the_official_fine_tuning_example(write_jsonl, tiny_family_dir):
    from tool_oracles import glm4_official_example

    from glmtune.models.loader import load_tokenizer

    tokenizer, family, _ = load_tokenizer(str(tiny_family_dir("glm4")))
    assert family == "glm4"
    encoder = _encoder(tokenizer, "glm4")
    assert encoder.template.name == "glm4"  # auto, although the tokenizer has a chat template
    official = glm4_official_example(tokenizer, GLM4_MESSAGES)
    features, _ = encode_samples([_one(write_jsonl, {"messages": GLM4_MESSAGES})], encoder, LengthLimits(),
                                 progress=False)
    assert features[0]["input_ids"] == official["input_ids"]
    assert features[0]["labels"] == official["labels"]
    text = tokenizer.decode(official["input_ids"])
    assert "<|assistant|>get_weather\n" in text and "## get_weather" in text and "<|observation|>" in text
    # the same conversation from OpenAI's format: the two assistant messages are one answer with a thought
    features, _ = encode_samples([_one(write_jsonl, OPENAI_ROW, "o.jsonl")], encoder, LengthLimits(), progress=False)
    assert features[0]["input_ids"] == official["input_ids"]
    assert features[0]["labels"] == official["labels"]


def test_layouts_without_tool_format_refuse_tool_conversations(write_jsonl, tiny_family_dir, tokenizer):
    from glmtune.models.loader import load_tokenizer

    sample = _one(write_jsonl, OPENAI_ROW)
    for family in ("chatglm", "chatglm2"):
        tok, _, _ = load_tokenizer(str(tiny_family_dir(family)))
        with pytest.raises(GlmtuneError, match="layout has no tool-calling format"):
            encode_samples([sample], _encoder(tok, family), LengthLimits(), progress=False)
    with pytest.raises(GlmtuneError, match="data.jsonl:1: .*chat template leaves out tool definitions and tool calls;"):
        encode_samples([sample], _encoder(tokenizer, "generic", "chat"), LengthLimits(), progress=False)


def test_a_chat_template_that_renders_tools_gets_them(write_jsonl, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}{% for m in messages %}<{{ m['role'] }}>"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function | tojson }}</call>{% endfor %}"
        "{% else %}{{ m['content'] }}{% endif %}</{{ m['role'] }}>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    sample = _one(write_jsonl, OPENAI_ROW)
    features, _ = encode_samples([sample], _encoder(tok, "generic", "chat"), LengthLimits(), progress=False)
    text = tok.decode(features[0]["input_ids"])
    trained = tok.decode([t for t in features[0]["labels"] if t != IGNORE_INDEX])
    assert text.startswith("<tools>") and '"name": "get_weather"' in text
    assert '<call>{"name": "get_weather", "arguments": {"city": "上海"}}</call>' in trained
    assert "<tool>25度，多云</tool>" in text and "<tool>" not in trained  # tool results are prompt, never trained


def test_tool_calls_parse_back_and_code_is_never_run():
    call = ToolCall("get_weather", {"city": "北京", "n": 2, "ok": False, "tags": ["a", "b"], "x": None})
    from glmtune.data.tool_format import json_call_text, python_call_text

    assert parse_tool_call("get_weather\n" + python_call_text(call), "chatglm3") == call
    assert parse_tool_call("get_weather\n" + json_call_text(call), "glm4") == call
    assert parse_tool_call("get_weather\n" + json_call_text(call), "glm4", {"other"}) is None
    assert parse_tool_call('{"name": "get_weather", "arguments": {"city": "北京"}}', "glm4").arguments == {"city": "北京"}
    assert parse_tool_call("\n北京今天晴。", "glm4") is None
    assert parse_tool_call("\n北京今天晴。", "chatglm3") is None
    assert parse_python_call("```python\ntool_call(x=__import__('os').getcwd())\n```") is None
    assert parse_python_call("tool_call(1, 2)") is None
    with pytest.raises(GlmtuneError, match="'my-city' is not a Python name"):
        python_call_text(ToolCall("f", {"my-city": "x"}))


def _trained_runs(feature) -> list[list[int]]:
    """The runs of consecutive trained positions, as token ids (each must equal the input there)."""
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    return runs + [current] * bool(current)


CONVERSATION = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
                             {"role": "assistant", "content": "first answer"},
                             {"role": "user", "content": "second question"},
                             {"role": "assistant", "content": "second answer"}]}


@pytest.mark.parametrize("family, template", [("generic", "plain"), ("generic", "chat"), ("chatglm", "auto"),
                                              ("chatglm2", "auto"), ("chatglm3", "auto"), ("glm4", "auto")])
def test_train_on_masks_position_by_position(family, template, write_jsonl, tiny_family_dir):
    from glmtune.models.loader import load_tokenizer

    tok, _, _ = load_tokenizer(str(tiny_family_dir(family)))
    sample = _one(write_jsonl, CONVERSATION)
    answers = ["first answer", "second answer"]
    for train_on, expected in (("all_assistant", answers), ("last_assistant", answers[1:])):
        encoder = _encoder(tok, family, template, train_on)
        features, report = encode_samples([sample], encoder, LengthLimits(), progress=False)
        runs = [run for f in features for run in _trained_runs(f)]
        one_answer = family in ("chatglm", "chatglm2")
        assert len(features) == (len(expected) if one_answer else 1)  # [Round i] layouts: one sample per answer
        assert report.samples == len(features)
        assert [tok.decode(run, skip_special_tokens=True).strip() for run in runs] == expected
        ends = encoder.stop_ids | {tok.convert_tokens_to_ids("<|user|>")} - {tok.unk_token_id, 0}
        for run in runs:  # each trained run holds the token that stops generation (a chat template may add "\n")
            assert ends.intersection(run[-2:])
        if one_answer and train_on == "all_assistant":  # the second sample holds the first answer as history
            assert "first answer" in tok.decode(features[1]["input_ids"])
            assert features[0]["input_ids"] != features[1]["input_ids"][:len(features[0]["input_ids"])]


def test_loss_false_and_history_never_train(write_jsonl, tokenizer):
    encoder = _encoder(tokenizer, "generic", "plain")
    row = {"conversations": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "skip me", "loss": False},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "keep me"}]}
    history = {"context": "q2", "target": "keep me", "history": [["q1", "skip me"]]}
    for item in (row, history):
        features, _ = encode_samples([_one(write_jsonl, item)], encoder, LengthLimits(), progress=False)
        assert [tokenizer.decode(r, skip_special_tokens=True).strip() for r in _trained_runs(features[0])] == ["keep me"]


def test_shipped_tool_samples_lay_out_in_both_families(tiny_family_dir, chatglm3_tokenizer):
    from importlib.resources import files

    from glmtune.models.loader import load_tokenizer

    path = files("glmtune") / "sample_data" / "tools_train.jsonl"
    samples, _ = load_samples(str(path))
    assert sum(bool(m.tool_calls) for s in samples for m in s.messages) >= 40
    glm4_tok, _, _ = load_tokenizer(str(tiny_family_dir("glm4")))
    for tok, family in ((chatglm3_tokenizer, "chatglm3"), (glm4_tok, "glm4")):
        features, report = encode_samples(samples, _encoder(tok, family), LengthLimits(), progress=False)
        assert len(features) == len(samples) and report.samples_cut == 0
        observation = tok.convert_tokens_to_ids("<|observation|>")
        for sample, feature in zip(samples, features):  # a tool result is never a target, only the token opening it
            trained = [t for t in feature["labels"] if t != IGNORE_INDEX]
            text = tok.decode(trained)
            assert not [m.content for m in sample.messages if m.role == "tool" and m.content in text]
            calls = sum(1 for a, b in zip(sample.messages, sample.messages[1:]) if a.tool_calls and b.role == "tool")
            assert trained.count(observation) == calls


def test_train_on_reaches_training_and_its_cache_key(write_jsonl, tiny_family_dir, tmp_path, monkeypatch):
    """`glmtune train`'s preparation hands train_on to the encoder (ChatGLM2: one sample per trained answer), and a
    cached tokenization under one value is not reused for the other."""
    from glmtune.config import TrainConfig
    from glmtune.train.recipe import prepare

    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl([CONVERSATION] * 4)
    counts = {}
    for train_on in ("all_assistant", "last_assistant", "all_assistant"):
        cfg = TrainConfig(model=str(tiny_family_dir("chatglm2")), train_file=str(data), train_on=train_on,
                          output_dir=str(tmp_path / f"run-{train_on}"), max_steps=1, padding_free=False)
        prepared = prepare(cfg)
        labels = sum(t != IGNORE_INDEX for f in prepared.train_features for t in f["labels"])
        counts.setdefault(train_on, []).append((len(prepared.train_features), labels))
    assert counts["all_assistant"][0] == counts["all_assistant"][1]
    (all_samples, all_labels), (last_samples, last_labels) = counts["all_assistant"][0], counts["last_assistant"][0]
    assert (all_samples, last_samples) == (8, 4) and last_labels < all_labels


def test_a_mix_keeps_every_sample_a_conversation_gives(write_jsonl, tiny_family_dir, tmp_path):
    """Mixing counts rows, a ChatGLM2 conversation with two trained answers gives two samples: every one of them
    reaches training, as often as its row is drawn."""
    from glmtune.config import TrainConfig
    from glmtune.train.recipe import prepare

    conversations = write_jsonl([CONVERSATION] * 4, "conversations.jsonl")
    single = write_jsonl([{"context": "q1", "target": "a1"}, {"context": "q2", "target": "a2"}], "single.jsonl")
    cfg = TrainConfig(model=str(tiny_family_dir("chatglm2")), train_file=[str(conversations), f"{single}:3"],
                      output_dir=str(tmp_path / "run"), max_steps=1, padding_free=False, dataset_cache=False)
    prepared = prepare(cfg)
    assert len(prepared.train_features) == 4 * 2 + 3
    shares = {Path(f.path).name: f for f in prepared.mix.files}
    one, _ = encode_samples(load_samples(conversations)[0][:1], _encoder(prepared.loaded.tokenizer, "chatglm2"),
                            LengthLimits(), progress=False)
    assert len(one) == 2
    assert shares["conversations.jsonl"].trained_tokens == 4 * sum(t != IGNORE_INDEX for f in one for t in f["labels"])


def test_predict_gives_each_row_its_tools_and_reads_calls_as_references_write_them(tiny_family_dir, tmp_path,
                                                                                   monkeypatch):
    from importlib.resources import files

    from glmtune.config import GenerationOptions
    from glmtune.data import preprocess
    from glmtune.evaluate.predictions import write_predictions
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    samples, _ = load_samples(str(files("glmtune") / "sample_data" / "tools_dev.jsonl"), require_answer=False)
    asked = [s for s in samples if s.tools][:2]
    seen, real = [], preprocess.Encoder.prompt_ids

    def spy(self, messages, limits=None, tools=None):
        seen.append(tools)
        return real(self, messages, limits, tools)

    monkeypatch.setattr(preprocess.Encoder, "prompt_ids", spy)
    generator = Generator(load_model(str(tiny_family_dir("chatglm3"))))
    write_predictions(generator, asked, tmp_path / "p.jsonl", generation=GenerationOptions(max_new_tokens=2),
                      progress=False)
    assert seen and all(tools == asked[i % 2].tools for i, tools in enumerate(seen[-2:]))

    tokenizer = generator.tokenizer
    call = next(m for s in samples for m in s.messages if m.tool_calls and not m.content)
    from glmtune.data.tool_format import python_call_text

    written = tokenizer.encode(f"{call.tool_calls[0].name}\n" + python_call_text(call.tool_calls[0]),
                               add_special_tokens=False)
    assert generator._answer_text(written, asked[0].tools) == call.reference_text()
    assert generator._answer_text(written, None) != call.reference_text()  # without tools: the text as written
