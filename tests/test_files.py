"""Issue 17, below the command line: the one place each kind of file goes through (glmtune.files, the data
and config readers) refuses hostile input in time and memory bounded by the input, and writes whole files
or nothing."""

from __future__ import annotations

import errno
import json
import os
import tracemalloc

import pytest

from glmtune.errors import GlmtuneError, shown
from glmtune.files import (MAX_NESTING, NestingError, check_output_file, check_output_folder, loads, replacing_all,
                           too_deep, write_text)

ROW = {"context": "What is 2 + 2?", "target": "4"}


# ---------------------------------------------------------------------------------------------------------
# A JSON array costs one pass, whatever its size


def test_line_numbers_count_each_character_once_and_are_right():
    from glmtune.data.formats import LineNumbers

    text = json.dumps([ROW] * 2000, indent=2)
    offsets = [i for i, ch in enumerate(text) if ch == "{"]
    lines = LineNumbers(text)
    assert [lines(o) for o in offsets] == [text.count("\n", 0, o) + 1 for o in offsets]
    assert lines.scanned <= len(text)  # counting from the start each time would scan ~2,000 x the text
    assert lines(offsets[3]) == text.count("\n", 0, offsets[3]) + 1  # an earlier offset is still right


def test_a_json_array_file_is_read_in_one_pass(tmp_path, monkeypatch):
    from glmtune.data import formats

    spies = []

    class Spy(formats.LineNumbers):
        def __init__(self, text):
            super().__init__(text)
            spies.append(self)

    monkeypatch.setattr(formats, "LineNumbers", Spy)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([ROW] * 20_000, indent=1), encoding="utf-8")  # about 1 MB, 80,001 lines
    records = formats.read_records(path)
    assert len(records) == 20_000 and [line for line, _ in records[:3]] == [2, 6, 10] and records[-1][0] == 79_998
    assert spies and spies[0].scanned <= path.stat().st_size


# ---------------------------------------------------------------------------------------------------------
# Nesting


def test_nesting_is_bounded_exactly_and_without_recursion():
    def nested(depth):
        return "[" * depth + "]" * depth

    assert loads(nested(MAX_NESTING)) is not None
    for depth in (MAX_NESTING + 1, 5_000, 100_000):
        with pytest.raises(NestingError, match="nested more than 100 levels"):
            loads(nested(depth))
    deep: list = []
    for _ in range(200_000):  # built in Python: too_deep must not recurse either
        deep = [deep]
    assert too_deep(deep) and not too_deep([[1], {"a": [2]}]) and not too_deep("text")


@pytest.mark.parametrize("name, text, where", [
    ("deep.jsonl", json.dumps(ROW) + "\n" + "[" * 5000 + "]" * 5000 + "\n", "deep.jsonl:2"),
    ("deep.json", "[\n" + json.dumps(ROW) + ",\n" + "{" + '"a": {' * 5000 + "}" * 5001 + "\n]", "deep.json:3"),
])
def test_deep_rows_are_refused_with_file_and_line(tmp_path, name, text, where):
    from glmtune.data.formats import load_samples

    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(GlmtuneError, match=f"{where}: invalid record: nested more than 100 levels"):
        load_samples(tmp_path / name)


def test_a_deep_answer_is_an_answer_that_does_not_parse():
    from glmtune.evaluate.metrics import compute_metrics, detect_task

    deep = "[" * 100_000
    assert detect_task(deep) == "generation"
    assert compute_metrics([(deep, '["a"]')])["tasks"]["classification"]["parse_rate"] == 0


# ---------------------------------------------------------------------------------------------------------
# Config files: aliases, nesting, YAML's own idea of what `off` means


BOMB = "\n".join(['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] +
                 [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)])


def test_aliases_of_lists_and_mappings_are_refused(tmp_path):
    from glmtune.config import read_config_file

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "\nlearning_rate: *a8\n", encoding="utf-8")  # 9^9 strings if ever walked whole
    with pytest.raises(GlmtuneError, match=r"bomb.yaml:2: not valid YAML: the alias \*a0 repeats a list"):
        read_config_file(bomb)
    merge = tmp_path / "merge.yaml"
    merge.write_text("base: &base {max_steps: 3}\n<<: *base\n", encoding="utf-8")
    with pytest.raises(GlmtuneError, match="merge.yaml:2.*alias"):
        read_config_file(merge)
    scalar = tmp_path / "scalar.yaml"  # an alias of a single value is harmless, and still works
    scalar.write_text("train_file: &data a.jsonl\ndev_file: *data\n", encoding="utf-8")
    assert read_config_file(scalar) == {"train_file": "a.jsonl", "dev_file": "a.jsonl"}


def test_deep_yaml_is_refused_before_python_recurses(tmp_path):
    from glmtune.config import read_config_file

    deep = tmp_path / "deep.yaml"
    deep.write_text("learning_rate: " + "[" * 50_000 + "]" * 50_000 + "\n", encoding="utf-8")
    with pytest.raises(GlmtuneError, match="deep.yaml:1: not valid YAML: nested more than 100 levels"):
        read_config_file(deep)


def test_a_message_never_draws_a_huge_value_whole():
    value: list = ["lol"] * 9
    for _ in range(8):  # shared references, as YAML aliases build them: 9^9 strings, a few hundred objects
        value = [value] * 9
    tracemalloc.start()
    try:
        text = shown(value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(text) <= 60 and text.startswith("[[[")
    assert peak < 5_000_000  # drawn whole it is gigabytes


@pytest.mark.parametrize("written, key", [
    ("off", "output_dir"), ("no", "output_dir"), ("yes", "train_file"), ("on", "dev_file"), ("1.10", "model"),
    ("017", "output_dir"), ("0x1F", "output_dir"), ("1_000", "output_dir"), ("12:30", "output_dir"),
    ("2024", "output_dir"), ("true", "lora_target"),
])
def test_yaml_words_for_text_options_stay_as_written(tmp_path, written, key):
    from glmtune.config import TrainConfig, build_config, read_config_file

    path = tmp_path / "run.yaml"
    path.write_text(f"{key}: {written}\noverwrite: yes\nmax_steps: 20\n", encoding="utf-8")
    config = build_config(TrainConfig, [(str(path), read_config_file(path))])
    assert getattr(config, key) == written
    assert config.overwrite is True and config.max_steps == 20  # typed options read YAML as before


def test_a_json_boolean_for_a_text_option_is_refused(tmp_path):
    from glmtune.config import TrainConfig, build_config, read_config_file

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"output_dir": False}), encoding="utf-8")
    with pytest.raises(GlmtuneError, match="run.json: output_dir must be text, got false; write it in quotes"):
        build_config(TrainConfig, [(str(path), read_config_file(path))])


# ---------------------------------------------------------------------------------------------------------
# Output paths


def test_output_file_checks(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("x\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(data)
    os.link(data, tmp_path / "hard")
    (tmp_path / "other").write_text("keep")
    (tmp_path / "to-other").symlink_to(tmp_path / "other")

    def refused(path, match, **kwargs):
        with pytest.raises(GlmtuneError, match=match):
            check_output_file(tmp_path / path, inputs=[data], **kwargs)

    refused("folder", "is a folder", overwrite=True)
    refused("data.jsonl/out.json", "data.jsonl is a file, not a folder", overwrite=True)
    refused("missing/" + "n" * 300, "too long for the file system", overwrite=False)
    refused("n" * 300, "too long for the file system", overwrite=False)
    for same in ("data.jsonl", "link", "hard"):
        refused(same, "is the input file", overwrite=True)
    refused("other", "already exists; pass --overwrite", overwrite=False)
    refused("to-other", "is a symbolic link; pass --overwrite", overwrite=False)
    assert check_output_file(tmp_path / "to-other", overwrite=True, inputs=[data])
    assert check_output_file(tmp_path / "new" / "deeper" / "out.json", overwrite=False, inputs=[data])
    assert check_output_file("/dev/null", overwrite=False)  # a device holds nothing to lose
    assert check_output_folder(tmp_path / "folder") and not check_output_folder(tmp_path / "new")
    with pytest.raises(GlmtuneError, match="exists and is not a folder"):
        check_output_folder(data)


def test_files_are_replaced_whole_or_not_at_all(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("old a")
    second.write_text("old b")
    with pytest.raises(RuntimeError):
        with replacing_all([first, second]) as (a, b):
            a.write("new a")
            raise RuntimeError("killed half-way")
    assert (first.read_text(), second.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]  # no temporary left

    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    write_text(tmp_path / "link", "new")
    assert target.read_text() == "keep" and not (tmp_path / "link").is_symlink()  # the link itself replaced

    fresh = tmp_path / "fresh.json"
    write_text(fresh, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # permissions of a plain new file, not 0600


def test_a_full_device_is_one_error_line():
    with pytest.raises(GlmtuneError) as refused:
        write_text("/dev/full", "x" * 100_000)
    assert str(refused.value) == "cannot write /dev/full: No space left on device"


def test_a_split_that_fails_while_writing_leaves_both_files(tmp_path, monkeypatch):
    from glmtune.data import split

    source = tmp_path / "all.jsonl"
    source.write_text("".join(json.dumps({"context": f"q{i}", "target": "a"}) + "\n" for i in range(20)))
    (tmp_path / "all.train.jsonl").write_text("earlier train")
    (tmp_path / "all.dev.jsonl").write_text("earlier dev")
    calls = []
    real_dumps = json.dumps

    def filling_up(value, **kwargs):
        calls.append(value)
        if len(calls) == 15:  # the disk fills up part-way through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dumps(value, **kwargs)

    monkeypatch.setattr(split.json, "dumps", filling_up)
    with pytest.raises(GlmtuneError, match="No space left on device"):
        split.split_file(source, dev_ratio=0.2, seed=1, overwrite=True)
    assert (tmp_path / "all.train.jsonl").read_text() == "earlier train"
    assert (tmp_path / "all.dev.jsonl").read_text() == "earlier dev"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.dev.jsonl", "all.jsonl", "all.train.jsonl"]


# ---------------------------------------------------------------------------------------------------------
# Messages


def test_every_line_of_a_multi_problem_error_starts_with_the_prefix(tmp_path, capsys):
    from glmtune.cli import main

    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"context": f"q{i}"}) + "\n" for i in range(25)), encoding="utf-8")
    assert main(["data", "validate", str(data)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 21 and all(line.startswith("glmtune: error: ") for line in lines)
    assert lines[0] == f"glmtune: error: {data}:1: missing field 'target'"
    assert lines[-1] == f"glmtune: error: {data}: 25 problems in the data (the first 20 listed above)"


def test_a_name_too_long_anywhere_is_one_line(capsys):
    from glmtune.cli import main

    assert main(["data", "validate", "x" * 5000]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glmtune: error: ") and "name is too long" in err and len(err) < 300


def test_an_unusable_dataset_cache_is_said_before_the_model_loads(tmp_path, monkeypatch, capsys, write_jsonl):
    from glmtune.cli import main
    from glmtune.train import recipe

    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GLMTUNE_CACHE", str(blocker))
    data = write_jsonl([ROW, ROW])
    said_before_loading = []

    def load_model(*args, **kwargs):
        said_before_loading.append("not caching tokenized data" in capsys.readouterr().err)
        raise GlmtuneError("stopped here by the test")

    monkeypatch.setattr(recipe, "load_model", load_model)
    assert main(["train", "--train-file", str(data), "--output-dir", str(tmp_path / "run")]) == 2
    assert said_before_loading == [True]
    assert not (tmp_path / "run").exists()


def test_deepspeed_and_training_folders_go_through_the_same_checks(tmp_path):
    from glmtune.train.distributed import check_deepspeed
    from glmtune.train.run_folder import check_output_dir

    deep = tmp_path / "ds.json"
    deep.write_text("{" + '"a": {' * 50_000 + "}" * 50_001, encoding="utf-8")
    with pytest.raises(GlmtuneError, match="deepspeed config .*ds.json: nested more than 100 levels"):
        check_deepspeed(str(deep))
    (tmp_path / "notes.txt").write_text("mine")
    for folder, match in ((tmp_path / ("n" * 300), "too long for the file system"),
                          (tmp_path / "notes.txt" / "run", "notes.txt is a file, not a folder"),
                          (tmp_path / "notes.txt", "output_dir .* exists and is not a folder")):
        with pytest.raises(GlmtuneError, match=match):
            check_output_dir(folder, overwrite=False, resume=False)
