"""train_file with several files (glmtune/data/mixing.py): every form and every mistake, the number of samples
each file gives, a seeded and reproducible shuffle, each file read in its own format, the share report
against counts made here, the dataset cache's keys, and a short `glmtune train` run over two files."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from glmtune.config import TrainConfig, build_config, read_config_file, to_yaml
from glmtune.data.mixing import DataSource, draw, encode_mixture, load_mixture, parse_train_file, plan_counts
from glmtune.data.preprocess import IGNORE_INDEX, Encoder, LengthLimits
from glmtune.data.templates import PlainTemplate
from glmtune.errors import GlmtuneError

NO_COLUMNS = {"prompt_column": None, "response_column": None, "prompt_template": None}


def task_rows(n: int) -> list[dict]:
    return [{"context": f"问题 {i}：把它翻译成英文。", "target": f"answer {i}" + " and more" * (i % 3)} for i in range(n)]


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"hello {i}, how are you?"},
                          {"role": "assistant", "content": f"fine {i}" + ", thanks" * (i % 4)}]} for i in range(n)]


@pytest.fixture
def files(write_jsonl):
    """A context/target task file of 70 rows and a messages file of 20 general conversations."""
    return write_jsonl(task_rows(70), "task.jsonl"), write_jsonl(chat_rows(20), "general.jsonl")


# ---------------------------------------------------------------------------------------------
# Forms


@pytest.mark.parametrize("value, expected", [
    ("task.jsonl", [DataSource("task.jsonl")]),
    (["task.jsonl", "general.jsonl:0.3"], [DataSource("task.jsonl"), DataSource("general.jsonl", weight=0.3)]),
    (["task.jsonl", "general.jsonl:300"], [DataSource("task.jsonl"), DataSource("general.jsonl", samples=300)]),
    ("task.jsonl:50", [DataSource("task.jsonl", samples=50)]),
    (["t.jsonl", "g.jsonl:.25", "h.jsonl:1e-1"],
     [DataSource("t.jsonl"), DataSource("g.jsonl", weight=0.25), DataSource("h.jsonl", weight=0.1)]),
    ([{"path": "task.jsonl"}, {"path": "general.jsonl", "weight": 0.3}],
     [DataSource("task.jsonl"), DataSource("general.jsonl", weight=0.3)]),
    ([{"path": "task.jsonl"}, {"path": "general.jsonl", "samples": 200}],
     [DataSource("task.jsonl"), DataSource("general.jsonl", samples=200)]),
    ({"path": "general.jsonl", "samples": 200}, [DataSource("general.jsonl", samples=200)]),
    # a ':' followed by something other than a number is part of the path (Windows drives, odd names)
    ("C:\\data\\task.jsonl", [DataSource("C:\\data\\task.jsonl")]),
    (["C:\\data\\task.jsonl", "D:\\general.jsonl:0.2"],
     [DataSource("C:\\data\\task.jsonl"), DataSource("D:\\general.jsonl", weight=0.2)]),
    ("runs:v2/task.jsonl", [DataSource("runs:v2/task.jsonl")]),
    (["a.jsonl", "general.jsonl : 0.3"], [DataSource("a.jsonl"), DataSource("general.jsonl", weight=0.3)]),
    (None, []),
])
def test_every_form_of_train_file(value, expected):
    assert parse_train_file(value) == expected


@pytest.mark.parametrize("value, message", [
    ("a.jsonl:0", "a number of samples must be at least 1, got 0"),
    ("a.jsonl:-3", "a number of samples must be at least 1, got -3"),
    (["t.jsonl", "a.jsonl:0.0"], "must be between 0 and 1 (not included), got 0"),
    (["t.jsonl", "a.jsonl:-0.2"], "must be between 0 and 1 (not included), got -0.2"),
    (["t.jsonl", "a.jsonl:1.0"], "for 1 sample write a.jsonl:1"),
    (["t.jsonl", "a.jsonl:2.5"], "must be between 0 and 1 (not included), got 2.5"),
    (["t.jsonl", "a.jsonl:300.0"], "for 300 samples write a.jsonl:300"),
    (["t.jsonl", "a.jsonl:0.6", "b.jsonl:0.4"], "the weights add up to 1"),
    (["t.jsonl", "a.jsonl:0.7", "b.jsonl:0.5"], "the weights add up to 1.2"),
    (["a.jsonl:0.3"], "give at least one file without a weight"),
    (["a.jsonl:0.3", "b.jsonl:0.2"], "give at least one file without a weight"),
    ([], "empty list"),
    (["t.jsonl", "./t.jsonl"], "lists './t.jsonl' twice"),
    ([{"path": "a.jsonl", "ratio": 0.3}], "unknown key 'ratio'"),
    ([{"weight": 0.3}], "needs path"),
    ([{"path": "a.jsonl", "weight": 0.3, "samples": 3}, "t.jsonl"], "both weight and samples"),
    ([{"path": "a.jsonl", "samples": 2.5}], "samples must be a whole number"),
    ([{"path": "a.jsonl", "samples": True}], "samples must be a whole number"),
    (["t.jsonl", {"path": "a.jsonl", "weight": "much"}], "weight must be a number"),
    (["t.jsonl", {"path": "a.jsonl", "weight": 1}], "must be between 0 and 1"),
    (["t.jsonl", 5430], "5430 is not a file name"),
    ("a.jsonl:", "has nothing after ':'"),
    (["t.jsonl", ""], "an empty file name"),
])
def test_every_mistake_is_one_line_naming_the_option(value, message):
    with pytest.raises(GlmtuneError) as raised:
        build_config(TrainConfig, [("run.yaml", {"train_file": value})])
    text = str(raised.value)
    assert text.startswith("run.yaml: train_file") and message in text and "\n" not in text


def test_the_cli_takes_several_files_and_gives_back_the_words_after_them(tmp_path):
    from glmtune.cli import build_parser
    from glmtune.config import config_from_args

    def config(*words):
        args, unknown = build_parser().parse_known_args(["train", *words])
        return config_from_args(TrainConfig, args, [w for w in unknown if not w.startswith("-")],
                                [w for w in unknown if w.startswith("-")])

    assert config("--train-file", "a.jsonl").train_file == "a.jsonl"  # one file: text, as before
    mixed = config("--train-file", "a.jsonl", "b.jsonl:0.3", "max_steps=5", "--seed", "7")
    assert (mixed.train_file, mixed.max_steps, mixed.seed) == (["a.jsonl", "b.jsonl:0.3"], 5, 7)
    assert config("--train_file", "a.jsonl", "--train-file", "b.jsonl:300").train_file == ["a.jsonl", "b.jsonl:300"]
    run = tmp_path / "run.yaml"
    run.write_text("max_steps: 9\n")
    assert config("--train-file", "a.jsonl", "b.jsonl:2", str(run)).max_steps == 9
    with pytest.raises(GlmtuneError, match="weights add up to 1.5"):
        config("--train-file", "a.jsonl", "b.jsonl:0.7", "c.jsonl:0.8")


def test_a_config_file_takes_lists_and_mappings_and_the_resolved_config_reads_back(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train_file:\n  - path: task.jsonl\n  - {path: general.jsonl, weight: 0.3}\n  - extra.jsonl:40\n")
    cfg = build_config(TrainConfig, [(str(run), read_config_file(run))])
    assert parse_train_file(cfg.train_file) == [DataSource("task.jsonl"), DataSource("general.jsonl", weight=0.3),
                                                DataSource("extra.jsonl", samples=40)]
    (tmp_path / "resolved.yaml").write_text(to_yaml(cfg))
    again = build_config(TrainConfig, [("resolved.yaml", read_config_file(tmp_path / "resolved.yaml"))])
    assert again.train_file == cfg.train_file
    flow = tmp_path / "flow.yaml"
    flow.write_text("train_file: [task.jsonl, general.jsonl:0.3]\n")
    assert build_config(TrainConfig, [("f", read_config_file(flow))]).train_file == ["task.jsonl", "general.jsonl:0.3"]
    one = tmp_path / "one.yaml"
    one.write_text("train_file: [task.jsonl]\n")
    assert build_config(TrainConfig, [("f", read_config_file(one))]).train_file == "task.jsonl"  # as one path


# ---------------------------------------------------------------------------------------------
# How many samples, which, in what order


def test_weights_are_shares_of_the_mixed_set():
    # 700 task rows + a 0.3 share: 300 general samples, 30 percent of 1000
    assert plan_counts([DataSource("t"), DataSource("g", weight=0.3)], [700, 5000]) == [700, 300]
    # whole 600 + 100 by number = 700 fixed; shares 0.2 and 0.1 of the total 1000 (700 / 0.7)
    sources = [DataSource("t"), DataSource("n", samples=100), DataSource("a", weight=0.2), DataSource("b", weight=0.1)]
    assert plan_counts(sources, [600, 40, 10, 9999]) == [600, 100, 200, 100]
    assert plan_counts([DataSource("t"), DataSource("g", weight=0.25)], [3, 1]) == [3, 1]  # 1.0 exactly
    assert plan_counts([DataSource("t"), DataSource("g", weight=0.1)], [5, 9]) == [5, 1]  # 0.556 rounds up


def test_a_count_above_the_rows_takes_every_row_as_evenly_as_it_can():
    rng = random.Random(0)
    picks = draw(7, 17, rng)
    assert len(picks) == 17 and set(Counter(picks).values()) == {2, 3} and sorted(set(picks)) == list(range(7))
    fewer = draw(100, 30, rng)
    assert len(set(fewer)) == 30 and all(0 <= i < 100 for i in fewer)


def test_the_mix_has_the_planned_counts_and_its_order_follows_the_seed(files):
    task, general = files
    mix = load_mixture([str(task), f"{general}:0.3"], read_with=NO_COLUMNS, seed=1)
    assert Counter(p for p, _ in mix.order) == {0: 70, 1: 30}  # 70 / 0.7 * 0.3
    assert sorted(r for p, r in mix.order if p == 0) == list(range(70))  # the task file whole, each row once
    general_rows = Counter(r for p, r in mix.order if p == 1)
    assert set(general_rows) == set(range(20)) and set(general_rows.values()) == {1, 2}  # 30 from 20 rows
    again = load_mixture([str(task), f"{general}:0.3"], read_with=NO_COLUMNS, seed=1)
    assert again.order == mix.order
    other = load_mixture([str(task), f"{general}:0.3"], read_with=NO_COLUMNS, seed=2)
    assert other.order != mix.order and Counter(p for p, _ in other.order) == {0: 70, 1: 30}
    # shuffled together: the general samples are spread over the whole set, not appended at its end
    positions = [i for i, (p, _) in enumerate(mix.order) if p == 1]
    assert positions[0] < 20 and positions[-1] > 80
    assert [s.where for s in mix.samples()] == [f"{mix.parts[p].source.path}:{r + 1}" for p, r in mix.order]


def test_changing_one_files_number_keeps_the_rows_of_the_others(files, write_jsonl):
    task, general = files
    extra = write_jsonl(task_rows(50), "extra.jsonl")
    first = load_mixture([str(task), f"{general}:10", f"{extra}:12"], read_with=NO_COLUMNS, seed=3)
    second = load_mixture([str(task), f"{general}:15", f"{extra}:12"], read_with=NO_COLUMNS, seed=3)
    assert sorted(r for p, r in first.order if p == 2) == sorted(r for p, r in second.order if p == 2)
    assert len([1 for p, _ in second.order if p == 1]) == 15


def test_max_train_samples_keeps_the_first_of_the_shuffled_mix(files):
    task, general = files
    whole = load_mixture([str(task), f"{general}:0.3"], read_with=NO_COLUMNS, seed=5)
    capped = load_mixture([str(task), f"{general}:0.3"], read_with=NO_COLUMNS, seed=5, max_samples=40)
    assert capped.order == whole.order[:40]


def test_one_file_is_read_as_before(files):
    from glmtune.data.formats import load_samples

    task, _ = files
    mix = load_mixture(str(task), read_with=NO_COLUMNS, seed=5, max_samples=30)
    assert mix.plain and mix.order == [(0, i) for i in range(30)]  # in file order, the first 30
    assert [s.messages for s in mix.samples()] == [s.messages for s in load_samples(task)[0][:30]]
    counted = load_mixture(f"{task}:30", read_with=NO_COLUMNS, seed=5)  # a number: drawn, then shuffled
    assert not counted.plain and len(counted.order) == 30 and counted.order != [(0, i) for i in range(30)]


def test_each_file_is_read_in_its_own_format(files, write_jsonl):
    task, general = files
    template = "Translate: {context}"
    mix = load_mixture([str(task), f"{general}:0.3"], read_with={**NO_COLUMNS, "prompt_template": template}, seed=1)
    assert [p.format for p in mix.parts] == ["context/target", "messages"]
    assert mix.parts[0].samples[4].messages[0].content == "Translate: 问题 4：把它翻译成英文。"
    assert mix.parts[1].samples[4].messages[0].content == "hello 4, how are you?"
    assert mix.parts[1].read_with["prompt_template"] is None  # and so its cache key, as a plain run of it
    columns = write_jsonl([{"content": f"c{i}", "summary": f"s{i}"} for i in range(6)], "adgen.jsonl")
    named = load_mixture([str(columns), f"{general}:2"],
                         read_with={**NO_COLUMNS, "prompt_column": "content", "response_column": "summary"}, seed=1)
    assert [p.format for p in named.parts] == ["columns", "messages"]
    array = general.parent / "general.json"  # a JSON array, pretty-printed: its first record spans lines
    array.write_text("\ufeff\n" + json.dumps(chat_rows(4), indent=2, ensure_ascii=False), encoding="utf-8")
    from_array = load_mixture([str(task), f"{array}:4"], read_with={**NO_COLUMNS, "prompt_template": template}, seed=1)
    assert [p.format for p in from_array.parts] == ["context/target", "messages"]
    more_chat = write_jsonl(chat_rows(5), "more_chat.jsonl")
    with pytest.raises(GlmtuneError, match="every file of train_file holds messages / conversations rows"):
        load_mixture([str(general), f"{more_chat}:3"], read_with={**NO_COLUMNS, "prompt_template": template}, seed=1)


def test_files_that_cannot_be_read_are_named(files, tmp_path):
    task, general = files
    cases = [
        ([str(task), str(tmp_path / "missing.jsonl")], "train_file: data file not found: "),
        ([f"{task}:abc", str(general)], "'abc' after ':' is not a number"),
        (f"{task}:abc", "'abc' after ':' is not a number"),
        (f"{task},{general}", "give each as its own value"),
    ]
    for value, message in cases:
        with pytest.raises(GlmtuneError) as raised:
            load_mixture(value, read_with=NO_COLUMNS, seed=1)
        assert message in str(raised.value) and "\n" not in str(raised.value), value


# ---------------------------------------------------------------------------------------------
# Tokenized: the share report and the cache


@pytest.fixture
def encoder(tokenizer):
    return Encoder(tokenizer, PlainTemplate())


def test_the_share_report_counts_what_trains(files, encoder, monkeypatch, tmp_path):
    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))
    task, general = files
    limits = LengthLimits(cutoff_len=12)  # cuts some rows of both files
    mix = load_mixture([str(task), f"{general}:0.3"], read_with=NO_COLUMNS, seed=4)
    features, report, shares = encode_mixture(mix, encoder, limits, key_extra={"t": 1}, progress=False)
    # counted here from each sample of the mix encoded on its own
    expected = {0: Counter(), 1: Counter()}
    cut_rows = {0: set(), 1: set()}
    for (part, row), feature in zip(mix.order, features):
        alone, cut = encoder.encode(mix.parts[part].samples[row], limits)
        assert alone["input_ids"] == feature["input_ids"] and alone["labels"] == feature["labels"]
        expected[part]["samples"] += 1
        expected[part]["tokens"] += len(alone["input_ids"])
        expected[part]["trained"] += sum(label != IGNORE_INDEX for label in alone["labels"])
        if cut.any:
            cut_rows[part].add(row)
    assert cut_rows[0] and cut_rows[1]
    total_tokens = sum(e["tokens"] for e in expected.values())
    total_trained = sum(e["trained"] for e in expected.values())
    assert (shares.samples, shares.tokens, shares.trained_tokens) == (100, total_tokens, total_trained)
    for part, share in enumerate(shares.files):
        assert (share.samples, share.tokens, share.trained_tokens) == (
            expected[part]["samples"], expected[part]["tokens"], expected[part]["trained"])
        assert share.sample_share == pytest.approx(expected[part]["samples"] / 100)
        assert share.token_share == pytest.approx(expected[part]["tokens"] / total_tokens)
        assert share.trained_share == pytest.approx(expected[part]["trained"] / total_trained)
        assert share.samples_cut == len(cut_rows[part])
    assert [(f.rule, f.format, f.rows, f.rows_used) for f in shares.files] == [
        ("whole", "context/target", 70, 70), ("weight 0.3", "messages", 20, 20)]
    assert report.samples == 90 and report.samples_cut == len(cut_rows[0]) + len(cut_rows[1])  # distinct rows
    lines = shares.lines()
    assert "100 samples" in lines[0] and "general.jsonl" in lines[2] and "rows repeated (20 distinct)" in lines[2]


def test_cache_keys_follow_the_files_the_numbers_and_the_seed(files, encoder, monkeypatch, tmp_path):
    from glmtune.data.cache import encode_cached
    from glmtune.data.formats import load_samples

    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))
    entries = tmp_path / "cache" / "datasets"
    task, general = files
    limits, key = LengthLimits(cutoff_len=64), {**NO_COLUMNS, "template": "plain"}

    def encode(value, seed=1, max_samples=None):
        mix = load_mixture(value, read_with=NO_COLUMNS, seed=seed, max_samples=max_samples)
        return encode_mixture(mix, encoder, limits, key_extra=key, progress=False)

    features, _, shares = encode(str(task), max_samples=30)
    assert shares is None and len(features) == 30
    # one file keys exactly as before mixing existed: a plain encode_cached call of its first 30 rows hits
    samples = load_samples(task)[0][:30]
    assert encode_cached(task, samples, encoder, limits, key_extra=key, progress=False)[2]
    encode([str(task), f"{general}:5"])  # the whole task file is one new entry, the 5 drawn rows another
    assert len(list(entries.glob("*.npz"))) == 3
    assert encode_cached(task, load_samples(task)[0], encoder, limits, key_extra=key, progress=False)[2]
    encode([str(task), f"{general}:5"])  # the same mix again: no new entry
    assert len(list(entries.glob("*.npz"))) == 3
    encode([str(task), f"{general}:5"], seed=2)  # other drawn rows: a new entry for them only
    assert len(list(entries.glob("*.npz"))) == 4
    encode([str(task), f"{general}:6"], seed=2)
    assert len(list(entries.glob("*.npz"))) == 5


# ---------------------------------------------------------------------------------------------
# Through `glmtune train`


def test_a_training_run_mixes_two_files_and_records_their_shares(tiny_model_dir, files, tmp_path, capsys):
    from glmtune.cli import main
    from glmtune.data.formats import load_samples
    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_tokenizer

    task, general = files
    out = tmp_path / "run"
    assert main(["train", "--train-file", str(task), f"{general}:0.3", f"model={tiny_model_dir}",
                 f"output_dir={out}", "--max-steps", "2", "--batch-size", "4", "--save-strategy", "no",
                 "--cutoff-len", "24", "--seed", "11", "--prompt-template", "Q: {context}"]) == 0
    recorded = json.loads((out / "data_mix.json").read_text())
    assert recorded["seed"] == 11 and recorded["samples"] == 100
    assert [(f["path"], f["rule"], f["rows"], f["samples"]) for f in recorded["files"]] == [
        (str(task), "whole", 70, 70), (str(general), "weight 0.3", 20, 30)]
    # the tokens counted here, from the files as the run read them and the template it used
    resolved = read_config_file(out / "resolved_config.yaml")
    assert resolved["train_file"] == [str(task), f"{general}:0.3"]
    tokenizer, family, _ = load_tokenizer(str(tiny_model_dir))
    encoder = Encoder(tokenizer, get_template(resolved["template"], tokenizer, family))
    limits = LengthLimits(cutoff_len=24)
    task_features = [encoder.encode(s, limits)[0] for s in load_samples(task, prompt_template="Q: {context}")[0]]
    general_features = [encoder.encode(s, limits)[0] for s in load_samples(general)[0]]
    times = Counter(r for p, r in load_mixture([str(task), f"{general}:0.3"], read_with=NO_COLUMNS,
                                               seed=11).order if p == 1)
    tokens = [sum(len(f["input_ids"]) for f in task_features),
              sum(times[i] * len(f["input_ids"]) for i, f in enumerate(general_features))]
    trained = [sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in task_features),
               sum(times[i] * sum(x != IGNORE_INDEX for x in f["labels"]) for i, f in enumerate(general_features))]
    assert [f["tokens"] for f in recorded["files"]] == tokens
    assert [f["trained_tokens"] for f in recorded["files"]] == trained
    assert recorded["files"][1]["trained_share"] == pytest.approx(trained[1] / sum(trained))
    err = capsys.readouterr().err
    assert "train_file mix (seed 11): 100 samples" in err and "weight 0.3" in err


def test_a_dry_run_shows_the_shares(tiny_model_dir, files, tmp_path, capsys):
    from glmtune.cli import main

    task, general = files
    assert main(["train", "--dry-run", "--train-file", str(task), f"{general}:10", f"model={tiny_model_dir}",
                 f"output_dir={tmp_path / 'run'}"]) == 0
    shown = capsys.readouterr().out
    assert "train_file mix (seed 42): 80 samples" in shown and "data_mix.json" in shown
    assert "- " + str(task) in shown  # the resolved options list both files
    assert not (tmp_path / "run").exists()


def test_a_mistake_in_train_file_stops_the_command_with_status_2(files, tmp_path, capsys):
    from glmtune.cli import main

    task, general = files
    assert main(["train", "--train-file", str(task), f"{general}:1.5", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glmtune: error: command line: train_file:") and "1.5" in err[0]


def test_a_mixed_run_resumes_and_a_plain_one_drops_the_old_record(tiny_model_dir, files, tmp_path):
    from glmtune.cli import main

    task, general = files
    out = tmp_path / "run"
    common = [f"model={tiny_model_dir}", f"output_dir={out}", "--batch-size", "4", "--save-steps", "1"]
    assert main(["train", "--train-file", str(task), f"{general}:12", "--max-steps", "1", *common]) == 0
    first = json.loads((out / "data_mix.json").read_text())
    assert main(["train", "--train-file", str(task), f"{general}:12", "--max-steps", "2", "--resume", *common]) == 0
    assert json.loads((out / "data_mix.json").read_text()) == first  # the same options drew the same mix
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    assert main(["train", "--train-file", str(task), "--max-steps", "3", "--resume", *common]) == 0
    assert not (out / "data_mix.json").exists()


def test_bench_reads_a_mix_and_will_not_write_over_any_of_its_files(tiny_model_dir, files, tmp_path, capsys):
    from glmtune.cli import main

    task, general = files
    words = ["bench", "--model", str(tiny_model_dir), "--data", str(task), f"{general}:10", "--steps", "1",
             "--warmup-steps", "1", "--batch-size", "2", "--recipe", "glmtune", "--in-process"]
    assert main([*words, "--json", str(general)]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert main([*words, "--json", str(tmp_path / "bench.json")]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["recipes"]["glmtune"]["steps"] == 1
