import contextlib
import copy
import logging
import os
import shutil
import subprocess

import pytest

from glmtune.data.cache import encode_cached
from glmtune.data.formats import load_samples
from glmtune.data.preprocess import Encoder, LengthLimits, encode_samples
from glmtune.data.templates import ChatTemplate, PlainTemplate

LIMITS = LengthLimits(max_target_length=6)  # cuts the long answers, so the report has examples
LONG_ANSWER = "北京是中华人民共和国的首都。" * 3
ROWS = [{"prompt": f"问题{i}：北京是哪国的首都？", "response": "中国" if i % 2 else LONG_ANSWER} for i in range(6)]


@pytest.fixture
def datasets(monkeypatch, tmp_path):
    """The cache's datasets folder, inside this test's tmp_path."""
    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "datasets"


@pytest.fixture
def inputs(write_jsonl, tokenizer):
    """encode_cached's arguments for a small file that the limits cut."""
    source = write_jsonl(ROWS)
    return {"source": source, "samples": load_samples(source)[0], "encoder": Encoder(tokenizer, PlainTemplate()),
            "limits": LIMITS, "key_extra": {"columns": None}}


def cached(args, **options):
    return encode_cached(args["source"], args["samples"], args["encoder"], args["limits"], name="train",
                         key_extra=args["key_extra"], progress=False, **options)


def plain(args):
    return encode_samples(args["samples"], args["encoder"], args["limits"], progress=False)


def entries(folder):
    return sorted(folder.glob("*.npz")) if folder.is_dir() else []


def test_second_run_is_served_from_the_cache_without_encoding(datasets, inputs, monkeypatch, caplog):
    expected_features, expected_report = plain(inputs)
    assert expected_report.samples_cut and expected_report.examples

    features, report, hit = cached(inputs)
    assert not hit and features == expected_features and report == expected_report
    assert len(entries(datasets)) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cache hit must not encode")

    monkeypatch.setattr(Encoder, "encode", no_encoding)
    with caplog.at_level(logging.INFO, logger="glmtune.data.cache"):
        features, report, hit = cached(inputs)
    assert hit and features == expected_features and report == expected_report
    assert f"tokenized train data loaded from cache ({entries(datasets)[0]})" in caplog.text


def _other_content(args, write_jsonl, tokenizer):
    rows = copy.deepcopy(ROWS)
    rows[3]["response"] = "上海"
    args["samples"] = load_samples(write_jsonl(rows))[0]  # the same path, rewritten


def _added_token(args, write_jsonl, tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_token>"])
    args["encoder"] = Encoder(other, PlainTemplate())


def _other_chat_template(args, write_jsonl, tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    args["encoder"] = Encoder(other, args["encoder"].template)


CHANGES = {
    "file content": _other_content,
    "limits": lambda args, *_: args.update(limits=LengthLimits(max_target_length=7)),
    "sample count": lambda args, *_: args.update(samples=args["samples"][:-1]),
    "key_extra": lambda args, *_: args.update(key_extra={"columns": ["prompt", "response"]}),
    "template": lambda args, _, tokenizer: args.update(encoder=Encoder(tokenizer, ChatTemplate(tokenizer))),
    "stop ids": lambda args, _, tokenizer: args.update(encoder=Encoder(tokenizer, PlainTemplate(), stop_ids={1})),
    "tokenizer with an added token": _added_token,
    "tokenizer's chat template": _other_chat_template,
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_whatever_the_tokens_depend_on_is_in_the_key(datasets, inputs, write_jsonl, tokenizer, change):
    assert not cached(inputs)[2]
    change(inputs, write_jsonl, tokenizer)
    expected_features, expected_report = plain(inputs)
    features, report, hit = cached(inputs)
    assert not hit and features == expected_features and report == expected_report
    assert len(entries(datasets)) == 2
    assert cached(inputs)[2]  # and the changed inputs have a stable key of their own


def test_a_copied_or_touched_file_still_hits(datasets, inputs, tmp_path):
    cached(inputs)
    os.utime(inputs["source"], (1e9, 1e9))
    assert cached(inputs)[2]

    copy_dir = tmp_path / "elsewhere"
    copy_dir.mkdir()
    copied = shutil.copy(inputs["source"], copy_dir / "renamed.jsonl")
    inputs.update(source=copied, samples=load_samples(copied)[0])
    features, report, hit = cached(inputs)
    assert hit and (features, report) == plain(inputs)
    assert all(where.startswith(str(copied)) for where in report.examples)  # the report names the copy
    assert len(entries(datasets)) == 1


def test_a_tokenizer_not_loaded_from_a_folder_is_keyed_by_its_vocabulary(datasets, inputs, tokenizer):
    other = copy.deepcopy(tokenizer)
    other.name_or_path = "not-a-folder"
    inputs["encoder"] = Encoder(other, PlainTemplate())
    assert not cached(inputs)[2]
    features, report, hit = cached(inputs)
    assert hit and (features, report) == plain(inputs)


@pytest.mark.parametrize("damage", [b"not a zip file", b"", "truncated"], ids=["garbage", "empty", "truncated"])
def test_a_corrupt_entry_is_encoded_again_and_rewritten(datasets, inputs, damage):
    cached(inputs)
    [entry] = entries(datasets)
    entry.write_bytes(entry.read_bytes()[:200] if damage == "truncated" else damage)
    features, report, hit = cached(inputs)
    assert not hit and (features, report) == plain(inputs)
    features, report, hit = cached(inputs)
    assert hit and (features, report) == plain(inputs)
    assert [p.name for p in datasets.iterdir()] == [entry.name]  # no temporary file left behind


def test_an_entry_for_other_samples_is_not_trusted(datasets, inputs):
    cached(inputs)
    [entry] = entries(datasets)
    shorter = dict(inputs, samples=inputs["samples"][:-1])
    cached(shorter)
    other = next(p for p in entries(datasets) if p != entry)
    shutil.copy(other, entry)  # an entry whose arrays hold one sample fewer
    features, report, hit = cached(inputs)
    assert not hit and (features, report) == plain(inputs)


def test_disabled_cache_neither_reads_nor_writes(datasets, inputs):
    for _ in range(2):
        features, report, hit = cached(inputs, enabled=False)
        assert not hit and (features, report) == plain(inputs)
    assert not datasets.exists()

    cached(inputs)
    [entry] = entries(datasets)
    written = entry.stat().st_mtime_ns
    assert not cached(inputs, enabled=False)[2]  # a valid entry is there, and not read
    assert entries(datasets) == [entry] and entry.stat().st_mtime_ns == written


@contextlib.contextmanager
def _unwritable(folder):
    """`folder` cannot be written into for the length of the block. Root ignores permission bits, so as root
    the folder is made immutable instead (chattr +i, which binds root too)."""
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o500)
    try:
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")  # the folder really refuses a write, whoever runs the test
        yield
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o700)


def test_a_read_only_cache_folder_only_warns(datasets, inputs, caplog):
    datasets.mkdir(parents=True)
    with _unwritable(datasets), caplog.at_level(logging.WARNING, logger="glmtune.data.cache"):
        features, report, hit = cached(inputs)
    assert not hit and (features, report) == plain(inputs)
    assert "could not write the tokenized data cache" in caplog.text
    assert list(datasets.iterdir()) == []


def test_a_cache_folder_that_cannot_be_created_only_warns(datasets, inputs, caplog):
    datasets.parent.mkdir(parents=True)
    datasets.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="glmtune.data.cache"):
        features, report, hit = cached(inputs)
    assert not hit and (features, report) == plain(inputs)
    assert "could not write the tokenized data cache" in caplog.text
