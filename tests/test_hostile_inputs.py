"""Hostile inputs, on purpose, for every command: each case builds its bad input in tmp_path, runs
`python -m glmtune ...` as its own process (forked from one that has done the imports once,
tests/forked_cli.py; so "no traceback" is proven on the real stderr and exit status) and expects

- exit status 2,
- stderr's last non-empty line starting `glmtune: error: ` (argparse's own `glmtune CMD: error: ` for option
  syntax it rejects itself) and naming the problem,
- no "Traceback" anywhere on stderr,
- nothing written: tmp_path (the command's working directory, and where every output it is told to write
  lies) holds exactly what the test made, byte for byte and timestamp for timestamp.

Cases fail before any model loads wherever they can; those that need a model use the tiny random ones of
conftest.py (copied into tmp_path before being damaged). 48 cases: data 13, config 14, models, adapters and
export 15, metrics and demo 3, serve and chat options 3; and 24 of issue 17 (a careless user on purpose):
nesting 3, names too long 5, outputs that are a device, a folder or under a file 5, an unusable cache 2, a
damaged checkpoint 1, outputs that would destroy an input or an earlier result 5, a YAML alias bomb, a JSON
false for a path and a multi-problem message 3. Their cheaper variants are tested in-process in
tests/test_files.py and tests/test_run_folder.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.slow  # about 70 processes (forked: tests/forked_cli.py), most well under a second

GOOD_ROW = {"context": "What is 2 + 2?", "target": "4"}
TEN_MB = 10 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# What the cases build from: tiny models and adapters made once per module (adapters are written by the
# methods themselves, untrained: these cases only need their shape)


@pytest.fixture(scope="module")
def forked_cli():
    """Each case is its own `python -m glmtune` process, forked from one that has done the imports."""
    from forked_cli import ForkedCli

    server = ForkedCli()
    yield server
    server.close()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir, tiny_family_dir, _isolated_cache):
    return Assets(tmp_path_factory.mktemp("hostile-assets"), tiny_model_dir, tiny_family_dir)


class Assets:
    def __init__(self, root: Path, tiny: Path, family_dir: Callable[[str], Path]):
        self.root, self.tiny, self._family_dir = root, tiny, family_dir
        self._built: dict[str, Path] = {}

    def family(self, name: str) -> Path:
        return self._family_dir(name)  # skips the case when a ChatGLM tokenizer fixture is missing

    def _once(self, name: str, build: Callable[[Path], None]) -> Path:
        if name not in self._built:
            folder = self.root / name
            build(folder)
            self._built[name] = folder
        return self._built[name]

    def narrow_llama(self) -> Path:
        """The tiny Llama's shape with hidden_size 32 instead of 64 (the same family, another base)."""

        def build(folder: Path) -> None:
            import torch
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            config = LlamaConfig.from_pretrained(self.tiny)
            config.hidden_size, config.head_dim = 32, 8
            LlamaForCausalLM(config).save_pretrained(folder)
            AutoTokenizer.from_pretrained(self.tiny).save_pretrained(folder)

        return self._once("narrow-llama", build)

    def adapter(self, method: str) -> Path:
        """A glmtune adapter folder over the tiny Llama: LoRA (rank 2) or P-Tuning v2 (pre_seq_len 4)."""

        def build(folder: Path) -> None:
            from glmtune.config import TrainConfig
            from glmtune.methods import get_method
            from glmtune.methods.adapter import write_adapter_info
            from glmtune.models.loader import fingerprint, load_model

            loaded = load_model(str(self.tiny), device="cpu")
            options = TrainConfig(model=str(self.tiny), method=method, lora_rank=2, pre_seq_len=4)
            chosen = get_method(method)
            model = chosen.apply(loaded.model, options, loaded.family)
            folder.mkdir()
            chosen.save(model, folder)
            write_adapter_info(folder, method=method, family=loaded.family, base_model=loaded.name,
                               fingerprint=fingerprint(loaded.model.config), template="auto",
                               parameters=chosen.parameters(options, loaded.family))

        return self._once(f"adapter-{method}", build)

    def run(self) -> Path:
        """What a training run folder holds, as far as these cases look (no training: they fail before that):
        resolved_config.yaml, train_log.jsonl, checkpoint-1 and checkpoint-2 with their trainer state."""

        def build(folder: Path) -> None:
            from glmtune.config import TrainConfig, to_yaml

            folder.mkdir()
            (folder / "resolved_config.yaml").write_text(to_yaml(TrainConfig(model=str(self.tiny))))
            (folder / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n')
            (folder / "metrics.json").write_text('{"global_step": 2}\n')
            for step in (1, 2):
                (folder / f"checkpoint-{step}").mkdir()
                (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))

        return self._once("run", build)


@dataclass
class Case:
    """The working folder (tmp_path) and helpers that build hostile inputs in it."""

    tmp: Path
    assets: Assets
    env: dict[str, str] = field(default_factory=dict)  # set for the command, over the test's environment

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def rows(self, name: str, *rows) -> Path:
        """A JSONL file; dicts are dumped, strings written as they are."""
        return self.write(name, "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                                        for r in rows))

    def good_data(self) -> Path:
        return self.rows("data.jsonl", GOOD_ROW, {"context": "Say hi.", "target": "hi"})

    def copy(self, source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, self.tmp / name))

    def damage_json(self, path: Path, **changes) -> Path:
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(changes)
        path.write_text(json.dumps(data), encoding="utf-8")
        return path

    def official_ptuning(self, rows: int = 4) -> Path:
        """An official ChatGLM2 P-Tuning checkpoint folder: pytorch_model.bin with the prefix table only."""
        import torch

        folder = self.tmp / "official-ptuning"
        folder.mkdir()
        # ChatGLM2's prefix width: layers x 2 (key, value) x kv_channels x key/value groups = 2 x 2 x 16 x 2
        table = {"transformer.prefix_encoder.embedding.weight": torch.zeros(rows, 128)}
        torch.save(table, folder / "pytorch_model.bin")
        return folder


# ---------------------------------------------------------------------------------------------------------
# The cases: (build(case) -> command-line words, words the error line must contain)


def _data_broken_json(c: Case):
    data = c.rows("broken.jsonl", GOOD_ROW, GOOD_ROW, '{"context": "a", target: "b"}', GOOD_ROW)
    return ["data", "validate", data], ["broken.jsonl:3", "invalid JSON"]


def _data_target_int(c: Case):
    data = c.rows("typed.jsonl", GOOD_ROW, {"context": "a", "target": 5})
    return ["predict", "--input", data, "--output", "out.jsonl"], ["typed.jsonl:2", "'target'", "string"]


def _data_messages_string(c: Case):
    data = c.rows("messages.jsonl", {"messages": "x"})
    return ["train", "--train-file", data, "--output-dir", "run"], ["messages.jsonl:1", "'messages'", "list"]


def _data_10mb_garbage_line(c: Case):
    data = c.write("garbage.jsonl", json.dumps(GOOD_ROW) + "\n" + "x" * TEN_MB + "\n" + json.dumps(GOOD_ROW) + "\n")
    return ["data", "validate", data], ["garbage.jsonl:2", "invalid JSON"]


def _data_10mb_unknown_role(c: Case):
    # valid JSON; the 10 MB value must not be echoed into the one-line message
    data = c.rows("role.jsonl", {"messages": [{"role": "x" * TEN_MB, "content": "hi"}]})
    return ["data", "validate", data], ["role.jsonl:1", "unknown role", "characters"]


def _data_empty_file(c: Case):
    return ["data", "validate", c.write("empty.jsonl", "")], ["empty.jsonl", "is empty"]


def _data_blank_lines(c: Case):
    data = c.write("blank.jsonl", "\n   \n\t\n\n")
    return ["data", "stats", data, "--model", c.assets.tiny], ["blank.jsonl", "only blank lines"]


def _data_not_utf8(c: Case):
    data = c.write("latin1.jsonl", json.dumps(GOOD_ROW).encode() + b"\n" + '{"context": "caf\xe9", "target": "b"}\n'
                   .encode("latin-1"))
    return ["eval", "--data", data, "--output", "eval-out"], ["latin1.jsonl:2", "UTF-8", "0xe9"]


def _data_array_non_object(c: Case):
    text = json.dumps([GOOD_ROW, GOOD_ROW], indent=1)  # 9 lines up to the second object's closing brace
    data = c.write("array.json", text[: text.rindex("]")].rstrip() + ",\n 5\n]\n")
    return ["data", "split", data, "--output-dir", "split-out"], ["array.json:10", "JSON object", "int"]


def _data_missing_file(c: Case):
    return ["predict", "--input", "nowhere.jsonl", "--output", "out.jsonl"], ["nowhere.jsonl", "not found"]


def _data_directory_as_file(c: Case):
    (c.tmp / "folder.jsonl").mkdir()
    return ["train", "--train-file", "folder.jsonl", "--output-dir", "run"], ["folder.jsonl", "not a file"]


def _data_bench_broken_line(c: Case):
    data = c.rows("bench.jsonl", GOOD_ROW, '{"context": "a", "target": "b"', GOOD_ROW)
    return (["bench", "--data", data, "--model", c.assets.tiny, "--steps", "1", "--json", "bench.json"],
            ["bench.jsonl:2", "invalid JSON"])


def _data_prompt_longer_than_context(c: Case):
    # 3,000 tokens against the tiny model's 1,024 positions: refused whole, naming the row, before any output
    data = c.rows("long.jsonl", GOOD_ROW, {"context": "hello " * 3000, "target": "x"})
    return (["predict", "--model", c.assets.tiny, "--input", data, "--output", "out.jsonl", "--max-new-tokens", "2"],
            ["long.jsonl:2", "prompt is", "context is 1024", "--max-source-length"])


def _config_negative_learning_rate(c: Case):
    return (["train", "--train-file", c.good_data(), "learning_rate=-1e-4", "--output-dir", "run"],
            ["learning_rate", "greater than 0"])


def _config_nan_learning_rate(c: Case):
    return ["train", "--train-file", c.good_data(), "--learning-rate", "nan", "--output-dir", "run"], \
        ["learning_rate", "finite"]


def _config_lora_rank_0(c: Case):
    return (["train", "--train-file", c.good_data(), "--lora-rank", "0", "--output-dir", "run"],
            ["lora_rank", "at least 1"])


def _config_lora_alpha_negative(c: Case):
    return (["train", "--train-file", c.good_data(), "--lora-alpha=-16", "--output-dir", "run"],
            ["lora_alpha", "greater than 0"])


def _config_batch_size_0(c: Case):
    config = c.write("run.yaml", f"train_file: {c.good_data()}\nbatch_size: 0\noutput_dir: run\n")
    return ["train", config], ["run.yaml", "batch_size", "at least 1"]


def _config_epochs_negative(c: Case):
    return (["train", "--train-file", c.good_data(), "--num-train-epochs=-1", "--output-dir", "run"],
            ["num_train_epochs", "greater than 0"])


def _config_unknown_key(c: Case):
    config = c.write("run.yaml", f"train_file: {c.good_data()}\nlerning_rate: 1e-4\n")
    return ["train", config, "--output-dir", "run"], ["run.yaml", "'lerning_rate'", "did you mean 'learning_rate'"]


def _config_wrong_type(c: Case):
    config = c.write("run.yaml", f"train_file: {c.good_data()}\nlearning_rate: abc\n")
    return ["train", config, "--output-dir", "run"], ["run.yaml", "learning_rate", "must be a number", "'abc'"]


def _config_not_a_mapping(c: Case):
    config = c.write("run.yaml", "- learning_rate\n- 1e-4\n")
    return ["train", config, "--output-dir", "run"], ["run.yaml", "mapping"]


def _config_broken_yaml(c: Case):
    config = c.write("run.yaml", "method: lora\nlearning_rate: [1e-4\nlora_rank: 8\n")
    return ["train", config, "--output-dir", "run"], ["run.yaml:3", "not valid YAML"]


def _config_max_source_length_0(c: Case):
    return (["bench", "--data", c.good_data(), "--max-source-length", "0", "--json", "bench.json"],
            ["max_source_length", "at least 1"])


def _config_dev_ratio(c: Case):
    return ["data", "split", c.good_data(), "--dev-ratio", "1.5"], ["dev_ratio", "between 0 and 1"]


def _config_pre_seq_len_beyond_context(c: Case):
    return (["train", "--model", c.assets.tiny, "--train-file", c.good_data(), "--method", "ptuning",
             "--pre-seq-len", "1024", "--max-steps", "1", "--output-dir", "run"],
            ["pre_seq_len 1024", "context is 1024"])


def _config_official_pre_seq_len_beyond_context(c: Case):
    return (["predict", "--model", c.assets.family("chatglm2"), "--adapter", c.official_ptuning(2000),
             "--pre-seq-len", "2000", "--input", c.good_data(), "--output", "out.jsonl"],
            ["pre_seq_len 2000", "context is 1024"])


def _model_empty_folder(c: Case):
    (c.tmp / "empty-model").mkdir()
    return ["predict", "--model", "empty-model", "--input", c.good_data(), "--output", "out.jsonl"], \
        ["empty-model", "config.json"]


def _model_truncated_shard(c: Case):
    model = c.copy(c.assets.tiny, "cut-model")
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return ["predict", "--model", model, "--input", c.good_data(), "--output", "out.jsonl"], \
        ["cut-model/model.safetensors", "cut short"]


def _model_index_names_missing_shard(c: Case):
    from safetensors.torch import load_file, save_file

    model = c.copy(c.assets.tiny, "sharded-model")
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(state)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({n: state[n].contiguous() for n in names[::2]}, str(model / first), metadata={"format": "pt"})
    # the second shard is never written: the index names a file that is not there
    weight_map = {n: first if i % 2 == 0 else second for i, n in enumerate(names)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ["eval", "--model", model, "--data", c.good_data(), "--output", "eval-out"], [second]


def _model_missing_tensor(c: Case):
    from safetensors.torch import load_file, save_file

    model = c.copy(c.assets.tiny, "incomplete-model")
    state = load_file(model / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    return ["predict", "--model", model, "--input", c.good_data(), "--output", "out.jsonl"], \
        ["incomplete", "model.layers.1.mlp.up_proj.weight"]


def _adapter_broken_json(c: Case):
    adapter = c.copy(c.assets.adapter("lora"), "adapter")
    (adapter / "glmtune_adapter.json").write_text('{"method": "lora", "family":', encoding="utf-8")
    return ["predict", "--adapter", adapter, "--input", c.good_data(), "--output", "out.jsonl"], \
        ["glmtune_adapter.json", "not valid JSON"]


def _adapter_truncated_weights(c: Case):
    adapter = c.copy(c.assets.adapter("lora"), "adapter")
    weights = adapter / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return ["export", "--adapter", adapter, "--merge", "--output", "export-out"], \
        ["adapter_model.safetensors", "cannot read"]


def _adapter_other_base(c: Case):
    return (["predict", "--adapter", c.assets.adapter("lora"), "--model", c.assets.narrow_llama(), "--input",
             c.good_data(), "--output", "out.jsonl"], ["hidden_size 64 vs 32"])


def _adapter_other_family(c: Case):
    return (["export", "--adapter", c.assets.adapter("lora"), "--model", c.assets.family("chatglm2"), "--merge",
             "--output", "export-out"], ["generic model", "chatglm2 model"])


def _adapter_other_family_compare(c: Case):
    return (["compare", "--adapter", c.assets.adapter("lora"), "--model", c.assets.family("chatglm2"), "--data",
             c.good_data(), "--output", "compare-out"], ["generic model", "chatglm2 model"])


def _adapter_ptuning_pre_seq_len_mismatch(c: Case):
    return (["eval", "--adapter", c.assets.adapter("ptuning"), "--pre-seq-len", "8", "--data", c.good_data(),
             "--output", "eval-out"], ["pre_seq_len 4", "--pre-seq-len 8"])


def _adapter_ptuning_weights_disagree(c: Case):
    adapter = c.copy(c.assets.adapter("ptuning"), "adapter")
    info = json.loads((adapter / "glmtune_adapter.json").read_text())
    c.damage_json(adapter / "glmtune_adapter.json", parameters={**info["parameters"], "pre_seq_len": 6})
    return ["predict", "--adapter", adapter, "--input", c.good_data(), "--output", "out.jsonl"], \
        ["pre_seq_len 4", "says 6", "damaged"]


def _adapter_official_without_pre_seq_len(c: Case):
    return (["predict", "--model", c.assets.family("chatglm2"), "--adapter", c.official_ptuning(), "--input",
             c.good_data(), "--output", "out.jsonl"], ["official P-Tuning checkpoint", "--pre-seq-len", "4 rows"])


def _adapter_official_pre_seq_len_mismatch(c: Case):
    return (["predict", "--model", c.assets.family("chatglm2"), "--adapter", c.official_ptuning(), "--pre-seq-len",
             "8", "--input", c.good_data(), "--output", "out.jsonl"], ["pre_seq_len 4", "--pre-seq-len 8"])


def _export_output_exists(c: Case):
    c.write("export-out/keep.txt", "mine")
    return ["export", "--adapter", c.assets.adapter("lora"), "--output", "export-out"], ["export-out", "--overwrite"]


def _export_merge_ptuning(c: Case):
    return ["export", "--adapter", c.assets.adapter("ptuning"), "--merge", "--output", "export-out"], \
        ["P-Tuning", "without --merge"]


def _metrics_not_utf8(c: Case):
    predictions = c.write("predictions.jsonl", b'{"target": "a", "prediction": "a"}\n'
                                               b'{"target": "caf\xe9", "prediction": "b"}\n')
    return ["metrics", "--predictions", predictions, "--output", "metrics.json"], ["predictions.jsonl:2", "UTF-8"]


def _metrics_output_is_a_folder(c: Case):
    predictions = c.rows("predictions.jsonl", {"target": "a", "prediction": "a"})
    (c.tmp / "metrics-folder").mkdir()
    return ["metrics", "--predictions", predictions, "--output", "metrics-folder"], ["metrics-folder"]


def _demo_model_empty_folder(c: Case):
    (c.tmp / "empty-model").mkdir()
    return ["demo", "--model", "empty-model", "--output-dir", "demo-out"], ["empty-model", "config.json"]


def _serve_port_out_of_range(c: Case):
    return ["serve", "--model", c.assets.tiny, "--port", "70000"], ["--port", "at most 65535"]


def _serve_bad_host(c: Case):
    return ["serve", "--model", c.assets.tiny, "--host", "999.1.1.1", "--port", "0"], ["999.1.1.1", "not known"]


def _chat_negative_temperature(c: Case):
    return ["chat", "--model", c.assets.tiny, "--temperature", "-1"], ["--temperature", "at least 0"]

# Issue 17. Tracebacks: nesting that makes Python's parsers recurse, names the file system refuses, outputs
# that are devices, folders or under files, a cache that cannot be written, checkpoints that cannot resume.

DEEP = 50_000  # levels: Python's own parsers give up near 1,000


def _deep_jsonl(c: Case):
    data = c.rows("deep.jsonl", GOOD_ROW, "[" * DEEP + "]" * DEEP, GOOD_ROW)
    return ["data", "validate", data], ["deep.jsonl:2", "nested more than 100 levels"]


def _deep_yaml_config(c: Case):
    config = c.write("run.yaml", f"train_file: {c.good_data()}\nlearning_rate: " + "[" * DEEP + "]" * DEEP + "\n")
    return ["train", config, "--output-dir", "run"], ["run.yaml:2", "nested more than 100 levels"]


def _deep_predictions(c: Case):
    predictions = c.rows("predictions.jsonl", {"target": "a", "prediction": "a"},
                         '{"target": "a", "prediction": ' + "[" * DEEP + "]" * DEEP + "}")
    return ["metrics", "--predictions", predictions], ["predictions.jsonl:2", "nested more than 100 levels"]


LONG = "n" * 300  # over every common file system's 255-byte limit on one name


def _long_data_name(c: Case):
    return ["data", "validate", f"{LONG}.jsonl"], ["name is too long", "characters"]


def _long_predict_output(c: Case):
    return (["predict", "--model", c.assets.tiny, "--input", c.good_data(), "--output", f"out/{LONG}.jsonl"],
            ["name", "too long"])


def _long_export_output(c: Case):
    return ["export", "--adapter", c.assets.adapter("lora"), "--output", LONG], ["name is too long"]


def _long_config_name(c: Case):
    return ["train", f"{LONG}.yaml"], ["name is too long"]


def _long_model_name(c: Case):
    return ["predict", "--model", LONG, "--input", c.good_data(), "--output", "out.jsonl"], ["name is too long"]


def _predict_to_dev_full(c: Case):
    return (["predict", "--model", c.assets.tiny, "--input", c.good_data(), "--output", "/dev/full",
             "--max-new-tokens", "2"], ["cannot write /dev/full", "No space left"])


def _predict_output_is_a_folder(c: Case):
    (c.tmp / "answers").mkdir()
    return ["predict", "--input", c.good_data(), "--output", "answers"], ["answers", "is a folder"]


def _predict_output_under_a_file(c: Case):
    c.write("notes.txt", "mine")
    return ["predict", "--input", c.good_data(), "--output", "notes.txt/out.jsonl"], ["notes.txt", "not a folder"]


def _split_output_dir_is_a_file(c: Case):
    c.write("notes.txt", "mine")
    return ["data", "split", c.good_data(), "--output-dir", "notes.txt"], ["notes.txt", "not a folder"]


def _eval_output_under_a_file(c: Case):
    c.write("notes.txt", "mine")
    return ["eval", "--data", c.good_data(), "--output", "notes.txt/eval"], ["notes.txt", "not a folder"]


def _cache_is_a_file(c: Case):
    c.env["GLMTUNE_CACHE"] = str(c.write("cache-file", "mine"))  # the default model is converted into the cache
    return ["predict", "--input", c.good_data(), "--output", "out.jsonl"], ["cache", "GLMTUNE_CACHE", "not a folder"]


def _cache_unwritable(c: Case):
    c.env["GLMTUNE_CACHE"] = "/proc/glmtune-cache"  # /proc takes no new folders, not even from root
    return ["eval", "--data", c.good_data(), "--output", "eval-out"], ["cache", "GLMTUNE_CACHE"]


def _resume_garbage_trainer_state(c: Case):
    run = c.copy(c.assets.run(), "run")
    (run / "checkpoint-2" / "trainer_state.json").write_text("{garbage", encoding="utf-8")
    return (["train", "--train-file", c.good_data(), "--output-dir", "run", "--resume"],
            ["checkpoint-2/trainer_state.json", "not valid JSON", "resume from checkpoint-1"])


# Overwritten without --overwrite (the snapshot proves nothing changed)


def _metrics_output_is_its_predictions(c: Case):
    predictions = c.rows("predictions.jsonl", {"target": "a", "prediction": "a"})
    return (["metrics", "--predictions", predictions, "--output", "predictions.jsonl", "--overwrite"],
            ["predictions.jsonl", "is the input file"])


def _metrics_output_is_a_link_to_another_file(c: Case):
    predictions = c.rows("predictions.jsonl", {"target": "a", "prediction": "a"})
    c.write("keep.json", "mine")
    (c.tmp / "metrics.json").symlink_to("keep.json")
    return ["metrics", "--predictions", predictions, "--output", "metrics.json"], ["metrics.json", "--overwrite"]


def _eval_into_a_training_run(c: Case):
    c.copy(c.assets.run(), "run")
    return ["eval", "--data", c.good_data(), "--output", "run", "--overwrite"], ["run", "holds a training run"]


def _compare_into_a_training_run(c: Case):
    c.copy(c.assets.run(), "run")
    return (["compare", "--adapter", c.assets.adapter("lora"), "--data", c.good_data(), "--output", "run"],
            ["run", "holds a training run"])


def _split_overwrite_dev_is_a_folder(c: Case):
    data = c.good_data()
    c.write("split-out/data.train.jsonl", "an earlier split, kept whole")
    (c.tmp / "split-out" / "data.dev.jsonl").mkdir()
    return (["data", "split", data, "--output-dir", "split-out", "--overwrite"],
            ["split-out/data.dev.jsonl", "is a folder"])


# Work and memory bounded by the input, also when it is wrong; messages one line per problem


def _yaml_alias_bomb(c: Case):
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    config = c.write("bomb.yaml", "\n".join(levels) + "\nlearning_rate: *a8\n")  # 9^9 strings when drawn whole
    return ["train", config, "--output-dir", "run"], ["bomb.yaml:2", "alias", "not supported"]


def _json_config_false_for_a_path(c: Case):
    config = c.write("run.json", json.dumps({"train_file": str(c.good_data()), "output_dir": False}))
    return ["train", config], ["run.json", "output_dir", "must be text"]


def _many_bad_rows(c: Case):
    data = c.rows("many.jsonl", *[{"context": f"q{i}"} for i in range(30)])
    return ["data", "validate", data], ["many.jsonl", "30 problems", "first 20"]


def case(build, *, id: str, prefix: str | None = None, xfail: str | None = None):
    """A table row; `prefix`: argparse's own `glmtune CMD: error: ` where argparse rejects the option itself."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(build, prefix, id=id, marks=marks)


CASES = [
    # data: every data-reading command, each problem named file:line
    case(_data_broken_json, id="data-validate-broken-json-line"),
    case(_data_target_int, id="predict-target-is-a-number"),
    case(_data_messages_string, id="train-messages-is-a-string"),
    case(_data_10mb_garbage_line, id="data-validate-10mb-garbage-line"),
    case(_data_10mb_unknown_role, id="data-validate-10mb-role-not-echoed"),
    case(_data_empty_file, id="data-validate-empty-file"),
    case(_data_blank_lines, id="data-stats-only-blank-lines"),
    case(_data_not_utf8, id="eval-non-utf8-line"),
    case(_data_array_non_object, id="data-split-json-array-with-a-number"),
    case(_data_missing_file, id="predict-missing-input"),
    case(_data_directory_as_file, id="train-directory-as-train-file"),
    case(_data_bench_broken_line, id="bench-broken-json-line"),
    case(_data_prompt_longer_than_context, id="predict-prompt-longer-than-context"),
    # config: ranges, types, files
    case(_config_negative_learning_rate, id="train-negative-learning-rate"),
    case(_config_nan_learning_rate, id="train-nan-learning-rate"),
    case(_config_lora_rank_0, id="train-lora-rank-0"),
    case(_config_lora_alpha_negative, id="train-lora-alpha-negative"),
    case(_config_batch_size_0, id="train-yaml-batch-size-0"),
    case(_config_epochs_negative, id="train-negative-epochs"),
    case(_config_unknown_key, id="train-yaml-unknown-key"),
    case(_config_wrong_type, id="train-yaml-learning-rate-abc"),
    case(_config_not_a_mapping, id="train-yaml-not-a-mapping"),
    case(_config_broken_yaml, id="train-yaml-broken"),
    case(_config_max_source_length_0, id="bench-max-source-length-0"),
    case(_config_dev_ratio, id="data-split-dev-ratio-1.5"),
    case(_config_pre_seq_len_beyond_context, id="train-pre-seq-len-at-context"),
    case(_config_official_pre_seq_len_beyond_context, id="predict-official-pre-seq-len-beyond-context"),
    # models and adapters
    case(_model_empty_folder, id="predict-model-empty-folder"),
    case(_model_truncated_shard, id="predict-model-truncated-safetensors"),
    case(_model_index_names_missing_shard, id="eval-model-index-names-missing-shard"),
    case(_model_missing_tensor, id="predict-model-missing-tensor"),
    case(_adapter_broken_json, id="predict-adapter-json-broken"),
    case(_adapter_truncated_weights, id="export-merge-adapter-weights-truncated"),
    case(_adapter_other_base, id="predict-adapter-for-another-base"),
    case(_adapter_other_family, id="export-lora-of-llama-on-chatglm2"),
    case(_adapter_other_family_compare, id="compare-lora-of-llama-on-chatglm2"),
    case(_adapter_ptuning_pre_seq_len_mismatch, id="eval-ptuning-pre-seq-len-mismatch"),
    case(_adapter_ptuning_weights_disagree, id="predict-ptuning-weights-disagree-with-json"),
    case(_adapter_official_without_pre_seq_len, id="predict-official-ptuning-without-pre-seq-len"),
    case(_adapter_official_pre_seq_len_mismatch, id="predict-official-ptuning-pre-seq-len-mismatch"),
    case(_export_output_exists, id="export-output-exists"),
    case(_export_merge_ptuning, id="export-merge-ptuning"),
    # metrics, demo
    case(_metrics_not_utf8, id="metrics-non-utf8-line"),
    case(_metrics_output_is_a_folder, id="metrics-output-is-a-folder"),
    case(_demo_model_empty_folder, id="demo-model-empty-folder"),
    # serve / chat options
    case(_serve_port_out_of_range, id="serve-port-70000", prefix="glmtune serve: error: "),
    case(_serve_bad_host, id="serve-unresolvable-host"),
    case(_chat_negative_temperature, id="chat-negative-temperature", prefix="glmtune chat: error: "),
    # issue 17: nesting Python's parsers would recurse into
    case(_deep_jsonl, id="data-validate-jsonl-nested-50000-deep"),
    case(_deep_yaml_config, id="train-yaml-nested-50000-deep"),
    case(_deep_predictions, id="metrics-prediction-row-nested-50000-deep"),
    # names too long for the file system
    case(_long_data_name, id="data-validate-name-too-long"),
    case(_long_predict_output, id="predict-output-name-too-long"),
    case(_long_export_output, id="export-output-name-too-long"),
    case(_long_config_name, id="train-config-name-too-long"),
    case(_long_model_name, id="predict-model-name-too-long"),
    # outputs that are devices, folders, or under files; a cache that cannot be written
    case(_predict_to_dev_full, id="predict-output-dev-full"),
    case(_predict_output_is_a_folder, id="predict-output-is-a-folder"),
    case(_predict_output_under_a_file, id="predict-output-under-a-file"),
    case(_split_output_dir_is_a_file, id="data-split-output-dir-is-a-file"),
    case(_eval_output_under_a_file, id="eval-output-under-a-file"),
    case(_cache_is_a_file, id="predict-cache-is-a-file"),
    case(_cache_unwritable, id="eval-cache-unwritable"),
    # --resume into a run it cannot continue (the run's resolved_config.yaml is left as it was)
    case(_resume_garbage_trainer_state, id="train-resume-garbage-trainer-state"),
    # overwritten without --overwrite, or an input destroyed
    case(_metrics_output_is_its_predictions, id="metrics-output-is-its-predictions"),
    case(_metrics_output_is_a_link_to_another_file, id="metrics-output-is-a-symlink"),
    case(_eval_into_a_training_run, id="eval-output-is-a-training-run"),
    case(_compare_into_a_training_run, id="compare-output-is-a-training-run"),
    case(_split_overwrite_dev_is_a_folder, id="data-split-overwrite-dev-is-a-folder"),
    # bounded work and memory; messages
    case(_yaml_alias_bomb, id="train-yaml-alias-bomb"),
    case(_json_config_false_for_a_path, id="train-json-output-dir-false"),
    case(_many_bad_rows, id="data-validate-30-bad-rows"),
]


# ---------------------------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root (hidden ones too): kind, size and modification time."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.lstat()
            found[str(path.relative_to(root))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize("build, prefix", CASES)
def test_hostile_input_is_refused_cleanly(build, prefix, tmp_path, assets, forked_cli):
    made = Case(tmp_path, assets)
    words, expected = build(made)
    before = _snapshot(tmp_path)
    started = time.monotonic()
    result = forked_cli.run(words, cwd=tmp_path, env={**os.environ, **made.env}, timeout=240)
    took = time.monotonic() - started
    where = f"glmtune {' '.join(map(str, words))[:300]}\n--- stderr ({took:.1f} s):\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, where
    assert result.returncode == 2, where
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(prefix or "glmtune: error: "), where
    if not prefix:  # glmtune's own error: every line of it starts so, also when it lists several problems
        error = result.stderr[result.stderr.index("glmtune: error: "):]
        assert all(line.startswith("glmtune: error: ") for line in error.splitlines() if line.strip()), where
    assert len(last) < 1000, where  # one readable line, never the hostile input itself
    for word in expected:
        assert word in last, f"{word!r} not in the error line\n{where}"
    assert _snapshot(tmp_path) == before, f"the command wrote or changed files\n{where}"


def test_a_valid_10mb_line_is_accepted_by_validate(tmp_path):
    """A 10 MB row is valid JSON and a valid sample: `data validate` accepts it, in seconds and without
    holding more than a few copies of it in memory (training or predicting with it cuts or refuses it by
    tokens, where the model's limits are known)."""
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"context": "word " * (TEN_MB // 5), "target": "x"}) + "\n", encoding="utf-8")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "glmtune", "data", "validate", str(data)], cwd=tmp_path,
                            env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK, 1 samples" in result.stdout, result.stderr
    assert time.monotonic() - started < 60
