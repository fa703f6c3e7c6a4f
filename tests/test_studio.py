"""`glmtune studio`: the option form comes from config.py, the studio's run is the `glmtune train` command it
shows, every word exists in both languages, and what a user types stays inside the runs folder."""

import dataclasses
import shlex
from pathlib import Path

import pytest
import yaml

from glmtune import config as config_module
from glmtune.config import TrainConfig, config_from_args, option
from glmtune.data.formats import Message
from glmtune.errors import GlmtuneError
from glmtune.studio import form
from glmtune.studio.presets import PRESETS, USER_OWNED
from glmtune.studio.texts import TEXTS, text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _cli_config(words: list[str]):
    """The TrainConfig `glmtune train WORDS` reads, through the real parser."""
    from glmtune.cli import build_parser

    args, unknown = build_parser().parse_known_args(["train", *words])
    flags = [w for w in unknown if w.startswith("-")]
    return config_from_args(TrainConfig, args, [w for w in unknown if not w.startswith("-")], flags)


def _other_value(field: form.OptionField):
    """A valid form value for `field` that differs from its default."""
    special = {"prompt_template": "问：{instruction}\n答：", "train_file": "data/a.jsonl, data/b.jsonl:0.3",
               "dev_file": "data/dev.jsonl", "model": "models/chatglm3-6b", "lora_target": "q_proj,v_proj",
               "deepspeed": "examples/deepspeed_zero2.json", "prompt_column": "content",
               "response_column": "summary"}
    if field.name in special:
        return special[field.name]
    if field.kind == "choice":
        return next(c for c in field.choices if c != field.default)
    if field.kind == "bool":
        return not field.default
    if field.kind == "auto_bool":
        return "false"
    if field.kind in ("int", "float"):
        base = field.default if field.default is not None else (field.minimum or field.above or 0)
        value = base + 1 if field.kind == "int" else base + 0.5
        if field.maximum is not None and value > field.maximum:
            value = (field.maximum + (field.minimum or 0)) / 2
        return value
    return "some-text"


def test_every_training_option_is_a_form_field_with_its_help_in_both_languages():
    fields = {f.name: f for f in form.option_fields()}
    expected = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in form.RUN_OWNED]
    assert sorted(fields) == sorted(expected)
    for f in dataclasses.fields(TrainConfig):
        if f.name in fields:
            shown = fields[f.name]
            assert shown.help("en") == f.metadata["help"] and shown.help("zh") == f.metadata["help_zh"]
            assert shown.choices == tuple(f.metadata.get("choices") or ())
    assert fields["method"].kind == "choice" and fields["packing"].kind == "bool"
    assert fields["use_rslora"].kind == "auto_bool" and fields["max_steps"].kind == "int"
    assert fields["learning_rate"].kind == "float" and fields["train_file"].kind == "files"
    assert [f.section for f in form.option_fields()][0] == "model"


def test_the_studio_runs_exactly_the_train_command_it_shows():
    """Every option set away from its default at once: the flags the studio runs give the same config."""
    fields = form.option_fields()
    values = {f.name: _other_value(f) for f in fields}
    options = form.given_options(values, fields)
    assert set(options) == {f.name for f in fields}, "every option differs from its default"
    studio_config = form.config_of(options)
    assert _cli_config(form.command_words(studio_config)) == studio_config
    assert studio_config.train_file == ["data/a.jsonl", "data/b.jsonl:0.3"]


def test_unset_options_stay_unset_and_pre_seq_len_alone_keeps_the_method():
    fields = form.option_fields()
    defaults = {f.name: f.empty() for f in fields}
    assert form.given_options(defaults, fields) == {}
    assert form.command_words(form.config_of({})) == []
    # the official scripts read pre_seq_len without method as P-Tuning; the studio's lora must stay lora
    config = form.config_of(form.given_options({**defaults, "pre_seq_len": 32}, fields))
    assert config.method == "lora"
    assert _cli_config(form.command_words(config)) == config


def test_form_values_round_trip_through_yaml():
    fields = form.option_fields()
    values = {f.name: _other_value(f) for f in fields}
    options = form.given_options(values, fields)
    again = form.form_values(yaml.safe_load(form.yaml_text(options)), fields)
    assert form.given_options(again, fields) == options


def test_an_option_added_to_config_py_appears_in_the_page(monkeypatch, tmp_path):
    """A new field in TrainingOptions shows up as a form field, labelled and explained in both languages, and
    reaches the train command; nothing in the studio names it."""
    import gradio as gr

    from glmtune.studio.actions import Studio
    from glmtune.studio.app import build

    @dataclasses.dataclass
    class TrainingOptions(config_module.TrainingOptions):
        studio_probe: int = option(3, "A probe option.", zh="一个探测选项。", minimum=1)

    @dataclasses.dataclass
    class Extended(config_module.ModelOptions, config_module.DataOptions, config_module.MethodOptions,
                   TrainingOptions):
        pass

    monkeypatch.setattr(config_module, "TrainingOptions", TrainingOptions)
    monkeypatch.setattr(config_module, "TrainConfig", Extended)
    probe = next(f for f in form.option_fields() if f.name == "studio_probe")
    assert (probe.section, probe.kind, probe.default) == ("training", "int", 3)
    assert form.command_words(form.config_of({"studio_probe": 7})) == ["--studio-probe", "7"]

    demo = build(Studio(tmp_path / "runs"))
    component = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "option-studio_probe")
    assert isinstance(component, gr.Number) and component.label == "studio_probe"
    assert component.info == "A probe option." and component.value == 3
    relabel = next(f.fn for f in demo.fns.values() if f.name == "relabel")
    outputs = next(f for f in demo.fns.values() if f.name == "relabel").outputs
    updates = dict(zip([o._id for o in outputs], relabel("zh")))
    assert updates[component._id]["info"] == "一个探测选项。"


def test_every_text_exists_in_both_languages_and_fills_the_same_fields():
    import string

    for key, (english, chinese) in TEXTS.items():
        assert english.strip() and chinese.strip(), key
        names = {name for _, name, _, _ in string.Formatter().parse(english) if name}
        assert names == {name for _, name, _, _ in string.Formatter().parse(chinese) if name}, key
    assert text("progress", "zh", name="a", status="x", step=1, total=3).startswith("**a**")


@pytest.mark.parametrize("name", [n for n, (example, *_) in PRESETS.items() if example])
def test_each_tutorial_preset_is_its_example_file(name):
    example, _, _, options = PRESETS[name]
    written = yaml.safe_load((EXAMPLES / example).read_text(encoding="utf-8"))
    assert options == {k: v for k, v in written.items() if k not in USER_OWNED}
    form.config_of(options)  # valid as it stands


def test_a_run_name_cannot_leave_the_runs_folder(tmp_path):
    from glmtune.studio.actions import Studio

    studio = Studio(tmp_path / "runs")
    values = {f.name: f.empty() for f in studio.fields}
    for name in ("../escape", "/tmp/escape", "a/b", ".hidden", "..", "x" * 300):
        with pytest.raises(GlmtuneError):
            studio.start(values, name)
    assert not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()
    # the options the run manager owns cannot be slipped in through a loaded YAML either
    loaded, ignored = studio.load_yaml("x.yaml", "output_dir: /tmp/elsewhere\nmax_steps: 3\n")
    assert ignored == ["output_dir"] and form.given_options(loaded, studio.fields) == {"max_steps": 3}


def test_yaml_errors_are_one_readable_line(tmp_path):
    from glmtune.studio.actions import Studio

    studio = Studio(tmp_path / "runs")
    with pytest.raises(GlmtuneError, match="x.yaml:2: not valid YAML"):
        studio.load_yaml("x.yaml", "max_steps: 3\n  bad: [\n")
    with pytest.raises(GlmtuneError, match="unknown option 'max_step'.*max_steps"):
        studio.load_yaml("x.yaml", "max_step: 3\n")
    with pytest.raises(GlmtuneError, match="max_steps must be at least 1"):
        studio.options({**{f.name: f.empty() for f in studio.fields}, "max_steps": 0})
    # the tutorials' names are read as glmtune's, as by glmtune train
    loaded, _ = studio.load_yaml("x.yaml", "per_device_train_batch_size: 2\nfp16: true\n")
    assert form.given_options(loaded, studio.fields) == {"batch_size": 2, "precision": "fp16"}


def test_the_shown_command_runs_as_shown(tmp_path):
    from glmtune.studio.actions import Studio

    studio = Studio(tmp_path / "runs")
    values = {**{f.name: f.empty() for f in studio.fields}, "max_steps": 3, "train_file": "d a t a.jsonl"}
    shown, yaml_text = studio.command(values, "run-1")
    words = shlex.split(shown)
    assert words[:2] == ["glmtune", "train"] and words[-2:] == ["--output-dir", str(tmp_path / "runs" / "run-1")]
    config = _cli_config(words[2:])
    assert (config.max_steps, config.train_file) == (3, "d a t a.jsonl")
    assert yaml.safe_load(yaml_text) == {"train_file": "d a t a.jsonl", "max_steps": 3}


# ---------------------------------------------------------------------------------------------------------
# The Results tab's actions on a real (tiny) run: metrics, the before/after report, chat, export


@pytest.fixture(scope="module")
def studio_run(tmp_path_factory):
    """(Studio, run name) of a finished 2-step run with a dev set, started through the studio's own Start."""
    from glmtune.paths import sample_data_dir
    from glmtune.studio.actions import Studio
    from test_studio_runs import wait

    studio = Studio(tmp_path_factory.mktemp("studio") / "runs")
    values = {f.name: f.empty() for f in studio.fields}
    values.update(train_file=str(sample_data_dir() / "train.jsonl"), dev_file=str(sample_data_dir() / "dev.jsonl"),
                  max_steps=2, max_train_samples=8, max_eval_samples=2, batch_size=2, cutoff_len=64,
                  logging_steps=1)
    name = studio.start(values, "tiny")
    assert wait(studio.runs, name).status == "finished", studio.runs.log_tail(name)
    yield studio, name
    studio.close_chat()


def test_results_report_chat_and_export_of_a_run(studio_run, tmp_path):
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
    from glmtune.methods.adapter import load_tuned_model

    studio, name = studio_run
    summary, report = studio.results(name, "en")
    assert summary.startswith(f"**{name}**: 2 steps") and report == ""
    assert studio.results(name, "zh")[0].startswith(f"**{name}**：2 步")

    studio.make_report(name, "en")  # glmtune compare on the run's dev_file (max_eval_samples of it)
    _, report = studio.results(name, "en")
    assert "base" in report.lower() and (studio.runs_dir / name / "compare" / "report.md").is_file()

    # chat: each side answers as that model alone would, the two generated together
    assert "Loaded" in studio.load_chat(name, "en")
    question = "What is 2+2?"
    *_, (base, tuned) = studio.chat(question, [], [], "en", max_new_tokens=12)
    options = GenerationOptions(max_new_tokens=12)
    folder = studio.runs.info(name).adapter
    expected = []
    for adapter in (None, folder):
        loaded, info = load_tuned_model(None, adapter)
        template = (info or {}).get("template") or "auto"
        expected.append(Generator(loaded, template).generate([[Message("user", question)]], options)[0])
    assert expected[0] != expected[1], "the adapter changed the answer: the test tells the two sides apart"
    assert (base, tuned) == tuple(expected) and base.strip()
    # the second turn carries each model's own conversation
    *_, (base2, _) = studio.chat("And 3+3?", [("user", question), ("assistant", base)], [], "en", max_new_tokens=4)
    assert base2.strip()

    # export: the merged checkpoint with its check line; an existing folder is one readable error
    out = tmp_path / "merged"
    said = studio.export(name, True, str(out), "en")
    assert (out / "config.json").is_file() and "check" in said.lower()
    with pytest.raises(GlmtuneError, match="merged"):
        studio.export(name, True, str(out), "en")


def test_results_say_what_is_missing_in_the_users_language(studio_run, tmp_path):
    from glmtune.studio.actions import Studio

    studio, name = studio_run
    fresh = Studio(tmp_path / "runs")
    with pytest.raises(GlmtuneError, match="载入"):
        next(fresh.chat("hi", [], [], "zh"))
    with pytest.raises(GlmtuneError, match="请先选择"):
        fresh.load_chat("", "zh")
    values = {f.name: f.empty() for f in fresh.fields}
    with pytest.raises(GlmtuneError, match="训练数据"):
        fresh.inspect_data(values, "zh")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "target": "b"}\n{"context": "a", "target": "b"}\n{broken\n', encoding="utf-8")
    with pytest.raises(GlmtuneError, match=r"bad.jsonl:3"):
        fresh.inspect_data({**values, "train_file": str(bad)}, "en")


def test_model_and_data_facts_in_both_languages(tmp_path):
    from glmtune.paths import sample_data_dir
    from glmtune.studio.actions import Studio

    studio = Studio(tmp_path / "runs")
    summary, fits = studio.describe_model("smollm2-135m", "zh")
    assert summary.startswith("**smollm2-135m**：模型族") and "134.52M" in summary
    assert [row[0] for row in fits] == ["lora", "qlora", "qlora", "ptuning"] and fits[0][1] == "全精度"
    values = {**{f.name: f.empty() for f in studio.fields}, "train_file": str(sample_data_dir() / "train.jsonl")}
    for lang, line in (("en", "line 1"), ("zh", "第 1 行")):
        summary, lengths, cuts, preview = studio.inspect_data(values, lang)
        assert "cutoff_len=1024: 0" in cuts
        assert "400" in summary and [row[0] for row in lengths] == ["prompt", "answer", "total"]
        assert f">{line}<" in preview and '<mark class="trained">' in preview


def test_a_bad_run_name_is_explained_in_the_users_language(tmp_path):
    from glmtune.studio.actions import Studio

    studio = Studio(tmp_path / "runs")
    values = {f.name: f.empty() for f in studio.fields}
    with pytest.raises(GlmtuneError, match="不是一个普通的目录名"):
        studio.start(values, "../x", "zh")
    with pytest.raises(GlmtuneError, match="not a plain folder name"):
        studio.command(values, "a/b", "en")
