"""The `glmtune` command: train, evaluate, chat, serve and export fine-tuned models, and data tools.

Errors a user can fix (GlmtuneError) are printed as one line without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from glmtune import __version__
from glmtune.config import (DEFAULT_MODEL, TrainConfig, add_arguments, add_generation_arguments, config_from_args,
                            generation_from_args, number_type)
from glmtune.errors import ERROR_PREFIX, GlmtuneError
from glmtune.families import TEMPLATE_NAMES

log = logging.getLogger("glmtune")


_positive_int = number_type(int, 1)


def _add_model_arguments(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    parser.add_argument("--model", default=None,
                        help=f"checkpoint folder or alias (default: the adapter's base model, else {DEFAULT_MODEL})")
    if several:
        parser.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                            help="adapter folder written by glmtune train (OUT/adapter or OUT/best), or a plain peft "
                                 "LoRA folder; repeatable: several adapters over one base, each served under its "
                                 "NAME (default: the run folder's name) beside the bare base, named base")
    else:
        parser.add_argument("--adapter", default=None,
                            help="adapter folder written by glmtune train (OUT/adapter or OUT/best), or a plain peft "
                                 "LoRA folder (adapter_config.json + adapter_model.*; name its base with --model)")
    parser.add_argument("--template", default=None, choices=TEMPLATE_NAMES,
                        help="prompt format (default: the adapter's, else auto)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="weight dtype (default: auto: float32 on CPU, bfloat16/float16 on GPU)")
    parser.add_argument("--quantization-bit", type=int, default=None, choices=(0, 4, 8),
                        help="quantize the base to 8 or 4 bits, or 0 for full weights (default: what the adapter "
                             "was trained over, else 0); the backend is the adapter's, else ChatGLM's own layout for "
                             "ChatGLM-6B/2/3 and bitsandbytes for the rest")
    parser.add_argument("--pre-seq-len", type=_positive_int, default=None,
                        help="prefix length of an official P-Tuning checkpoint given as --adapter "
                             "(glmtune adapters record their own)")
    _add_prompt_template_argument(parser, "the adapter's prompt_template, else none; chat, serve and webui fill "
                                          "its one field with the typed message")


def _add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-batch", type=_positive_int, default=32, metavar="N",
                        help="answers generated together, each joining and leaving between decoding steps; more "
                             "requests wait in the queue (default: 32; 1 answers one request at a time)")
    parser.add_argument("--max-batch-tokens", type=_positive_int, default=None, metavar="N",
                        help="the batch's key/value cache in tokens (rows times the longest prompt plus answer), "
                             "which bounds its memory; a request that would pass it waits (default: what 2 GiB "
                             "holds for this model, at least one full context)")


def _add_server_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=number_type(int, 0, maximum=65535), default=port,
                        help=f"TCP port (default: {port}; 0 picks a free one and prints it)")


def _add_column_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-column", default=None, help="read prompts from this column")
    parser.add_argument("--response-column", default=None, help="read answers from this column")


def _add_prompt_template_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--prompt-template", default=None, metavar="TEXT",
                        help="write each prompt from the row's fields, e.g. '问：{instruction}\\n答：'; '' for none "
                             f"(default: {default}; docs/data.md#prompt_template)")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSON/JSONL file with answers, in any format train accepts")
    parser.add_argument("--output", required=True,
                        help="output folder; running the same command again continues an interrupted run")
    parser.add_argument("--task", default="auto", choices=("auto", "generation", "extraction", "classification"),
                        help="auto (default) detects each row's task from its answer's shape")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per batch (default: 8)")
    parser.add_argument("--max-samples", type=_positive_int, default=None, help="only the first N rows")
    parser.add_argument("--max-source-length", type=_positive_int, default=None,
                        help="cut longer prompts to this many tokens (default: no limit)")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of continuing an earlier run")
    _add_column_arguments(parser)
    add_generation_arguments(parser)


class _Parser(argparse.ArgumentParser):
    """Every --multi-word-option is also accepted as --multi_word_option (the spelling of the tutorials'
    scripts), on every command: a second, hidden flag for the same value. Subcommand parsers are this class too
    (argparse makes them of the parent's class)."""

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        underscored = ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
        underscored = [n for n in underscored if n not in names]  # train's options name both spellings already
        if underscored and not kwargs.get("required"):
            super().add_argument(*underscored, **{**kwargs, "dest": action.dest, "help": argparse.SUPPRESS})
        return action


# One builder per command: it adds the command's parser and names the function that runs it (set_defaults);
# `leftovers`: the command reads the words argparse does not know (train's and bench's config options).


def _add_train(commands) -> None:
    # CONFIG and key=value words are read from argparse's leftovers, so they may stand anywhere.
    train = commands.add_parser(
        "train", allow_abbrev=False, help="fine-tune a model",
        usage="glmtune train [CONFIG.yaml|.json] [key=value ...] [--option VALUE ...]",
        description="Fine-tune a model. Options come from an optional YAML/JSON config file, then key=value "
                    "words, then --flags (later wins): `glmtune train run.yaml max_steps=50 --learning-rate 1e-4`. "
                    "Every option below can be written in any of the three ways. The option names of the ChatGLM "
                    "tutorials and transformers' TrainingArguments (per_device_train_batch_size, fp16, "
                    "model_name_or_path ...) are read as glmtune's, each with a note (docs/training.md).")
    add_arguments(train, TrainConfig)
    train.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                       help="train data-parallel in N processes on this machine (one per GPU; gloo on the CPU): "
                            "runs this command under torchrun; batch_size is per process, so the global batch is "
                            "N x batch_size (default: 1; several machines: docs/distributed.md)")
    train.add_argument("--train-args-file", "--train_args_file", dest="train_args_file", default=None, metavar="FILE",
                       help="a tutorial's TrainingArguments JSON, read as the config file (the tutorials' and "
                            "TrainingArguments' option names are read as glmtune's: docs/training.md); instead of "
                            "CONFIG, not with it")
    train.add_argument("--dry-run", "--dry_run", action="store_true", dest="dry_run",
                       help="check the config without loading weights or writing anything: read the model "
                            "folder's config.json and tokenizer and the data, check output_dir, and print the "
                            "resolved options, trainable parameters, data and cut counts, steps and what a run "
                            "would write")
    train.set_defaults(func=_cmd_train, leftovers=True)


def _add_predict(commands) -> None:
    predict = commands.add_parser("predict", allow_abbrev=False, help="answer every row of a data file",
                                  description="Batched generation (greedy unless --temperature > 0) with left "
                                              "padding; each output line is the input row plus `prediction`, "
                                              "written as soon as its batch is done.")
    _add_model_arguments(predict)
    predict.add_argument("--input", required=True, help="JSON/JSONL file in any format train accepts; answers optional")
    predict.add_argument("--output", required=True, help="JSONL file to write")
    predict.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per batch (default: 8)")
    predict.add_argument("--max-source-length", type=_positive_int, default=None,
                         help="cut longer prompts to this many tokens (default: no limit)")
    predict.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    _add_column_arguments(predict)
    add_generation_arguments(predict)
    predict.set_defaults(func=_cmd_predict)


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval", allow_abbrev=False, help="answer a data file and score the answers",
        description="Batched generation (greedy unless --temperature > 0, then seeded) into OUTPUT/predictions.jsonl, "
                    "streamed and resumable: the same command continues an interrupted run. Then the metrics "
                    "(docs/metrics.md) into OUTPUT/metrics.json and a table.")
    _add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_eval)


def _add_compare(commands) -> None:
    compare = commands.add_parser(
        "compare", allow_abbrev=False, help="base vs tuned model on the same data, with report.md",
        description="Runs `eval` twice, for the adapter's base model (OUTPUT/base) and for the tuned model "
                    "(OUTPUT/tuned), then writes OUTPUT/report.md: metric table, per-task results and examples "
                    "side by side.")
    _add_eval_arguments(compare)
    compare.set_defaults(func=_cmd_compare)


def _add_metrics(commands) -> None:
    metrics = commands.add_parser(
        "metrics", allow_abbrev=False, help="score an existing predictions file",
        description="Metrics from a JSONL file whose lines hold `target` and `prediction` (other fields are "
                    "ignored), without loading a model.")
    metrics.add_argument("--predictions", required=True, help="JSONL file with target and prediction per line")
    metrics.add_argument("--task", default="auto", choices=("auto", "generation", "extraction", "classification"),
                         help="auto (default) detects each row's task from its target's shape")
    metrics.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    metrics.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    # looked up when the parser is built, so a test can stand in for it
    metrics.set_defaults(func=_cmd_metrics)


def _add_chat(commands) -> None:
    chat = commands.add_parser("chat", allow_abbrev=False, help="chat in the terminal",
                               description="Interactive chat that streams the answer. 'clear' forgets the "
                                           "conversation, 'exit' or Ctrl-D leaves, Ctrl-C stops an answer "
                                           "in progress.")
    _add_model_arguments(chat)
    chat.add_argument("--no-history", action="store_true", help="answer every message on its own")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--tools", default=None, metavar="FILE",
                      help="JSON file listing the tools the model may call (OpenAI's {\"type\": \"function\", "
                           "\"function\": {...}} or ChatGLM3's {\"name\", \"description\", \"parameters\"}); "
                           "ChatGLM3 and GLM-4 models only. A call is shown and you type its result")
    add_generation_arguments(chat, defaults={"max_new_tokens": 512})
    chat.set_defaults(func=_cmd_chat)


def _add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve", allow_abbrev=False, help="OpenAI-compatible HTTP API",
        description="Serves a model (base, base + adapter, or several adapters over one base with --adapter "
                    "NAME=DIR ...) through an OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions "
                    "(streamed with \"stream\": true; its model field picks the adapter), GET /health. Requests are "
                    "answered together (continuous batching): each joins the running batch between decoding "
                    "steps and leaves it when done; beyond --max-batch they wait in a queue. Ctrl-C stops it.")
    _add_model_arguments(serve, several=True)
    _add_server_arguments(serve, 8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every request but /health; printable ASCII, as "
                            "HTTP headers carry it (default: $GLMTUNE_API_KEY, else no key)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="also answer requests whose Host header is NAME, e.g. the name a proxy or other "
                            "machines use; repeatable; '*' answers any (default: only the --host address, plus "
                            "localhost names on loopback and any IP address on 0.0.0.0)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="let web pages at ORIGIN (e.g. http://localhost:3000) call the API: CORS headers for "
                            "it; repeatable; '*' allows any page (default: none)")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=4 * 1024 * 1024, metavar="N",
                       help="largest request body; larger ones are answered 413 before they are read "
                            "(default: 4194304, 4 MiB)")
    serve.add_argument("--read-timeout", type=number_type(float, 0, above=True), default=30.0, metavar="SECONDS",
                       help="time a client has to send a request's headers, and again its body; slower requests "
                            "are dropped (headers) or answered 408 (default: 30)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients see (default: the run's or the model's folder name)")
    # a request gives its own sampling options; the server sets only the length of answers that give none
    add_generation_arguments(serve, only=("max_new_tokens",), defaults={"max_new_tokens": 512},
                             helps={"max_new_tokens": "answer length when a request gives no max_tokens "
                                                      "(default: {default}, cut to the context)"})
    _add_batching_arguments(serve)
    serve.add_argument("--max-queue", type=_positive_int, default=256,
                       help="requests allowed to wait while the batch is full; more are answered 503 (default: 256)")
    serve.set_defaults(func=_cmd_serve)


def _add_webui(commands) -> None:
    webui = commands.add_parser(
        "webui", allow_abbrev=False, help="chat in the browser (Gradio)",
        description="A chat page (Gradio) with history, a clear button and sliders for answer length, temperature "
                    "and top-p; answers stream in. With several --adapter NAME=DIR the page has a model choice "
                    "(the adapters and the base). Ctrl-C stops it.")
    _add_model_arguments(webui, several=True)
    _add_server_arguments(webui, 7860)
    webui.add_argument("--system", default=None, help="system prompt")
    _add_batching_arguments(webui)
    add_generation_arguments(webui, defaults={"max_new_tokens": 512})
    webui.set_defaults(func=_cmd_webui)


def _add_studio(commands) -> None:
    studio = commands.add_parser(
        "studio", allow_abbrev=False, help="fine-tune from the browser (Gradio), in Chinese or English",
        description="A page (Gradio) to fine-tune without the command line: inspect a model and data, set every "
                    "training option (with the equivalent glmtune train command), start, watch, stop and resume runs "
                    "(each its own process: closing the page does not stop it), read the before/after report, chat "
                    "with the base and the tuned model side by side, and export. Ctrl-C stops the page, not the runs.")
    _add_server_arguments(studio, 7860)
    studio.add_argument("--runs-dir", default="runs",
                        help="the folder the studio writes runs to and lists runs from (default: runs)")
    studio.set_defaults(func=_cmd_studio)


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", allow_abbrev=False, help="merge a LoRA into its base, or export a P-Tuning prefix",
        description="With --merge, folds a LoRA adapter into its base weights and saves a normal checkpoint "
                    "(transformers families: loadable by plain transformers; ChatGLM-6B/2/3: the official folder "
                    "layout and weight names). A LoRA trained over a quantized base is merged into the dequantized "
                    "weights it was trained against. Without --merge, a LoRA adapter is written in --dtype, and a "
                    "P-Tuning v2 adapter becomes one small prefix file (projection folded in) plus its parameters, "
                    "which predict, chat, serve and webui load with --adapter. Merged and base+adapter answers are "
                    "compared on a few prompts unless --no-check.")
    export.add_argument("--adapter", required=True,
                        help="adapter folder written by glmtune train (OUT/adapter or OUT/best), or a plain peft LoRA "
                             "folder (adapter_config.json + adapter_model.*; name its base with --model)")
    export.add_argument("--model", default=None, help="base checkpoint folder or alias (default: the adapter's base model)")
    export.add_argument("--output", required=True, help="folder to write (must not exist, or be empty, unless --overwrite)")
    export.add_argument("--merge", action="store_true", help="LoRA only: fold the adapter into the base weights")
    export.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                        help="weight dtype of the export (default: the base checkpoint's for --merge, else float32)")
    export.add_argument("--no-check", action="store_true", help="skip comparing the export's answers with the adapter's")
    export.add_argument("--overwrite", action="store_true", help="replace --output if it holds files")
    export.set_defaults(func=_cmd_export)


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", allow_abbrev=False, help="before/after LoRA fine-tuning on the sample data",
                               description="Evaluate the default model on the shipped sample dev set, fine-tune it "
                                           "with LoRA on the sample train set for a few minutes, evaluate again, "
                                           "and print a before/after table.")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder or alias (default: {DEFAULT_MODEL})")
    demo.add_argument("--output-dir", default=None, help="where to write everything (default: runs/demo-<date>-<time>)")
    demo.add_argument("--max-steps", type=_positive_int, default=None, help="training steps (default: the demo recipe's)")
    demo.add_argument("--dev-samples", type=_positive_int, default=None,
                      help="evaluate on the first N dev rows (default: the demo recipe's)")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    demo.set_defaults(func=_cmd_demo)


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench", allow_abbrev=False, help="training speed, memory and utilisation: glmtune's recipe vs the tutorials'",
        usage="glmtune bench [CONFIG.yaml|.json] [key=value ...] --data FILE [--steps N] [--recipe R] [--option VALUE ...]",
        description="Runs warm-up plus N optimizer steps of glmtune's training recipe and of the ChatGLM tutorials' "
                    "recipe (every sample padded to max_source_length + max_target_length, gradient checkpointing "
                    "on, logits at every position), each in a process of its own, on the same model, method and "
                    "data, and prints steps/s, samples/s, real and padded tokens/s, peak memory and model FLOPs "
                    "utilisation against the device's matmul peak measured in the same run (docs/benchmarks.md), "
                    "as a table and as one JSON line. Training options work as for train; without length limits "
                    "the tutorials' max_source_length=100 and max_target_length=100 apply to both recipes.")
    bench.add_argument("--data", dest="train_file", default=argparse.SUPPRESS, metavar="FILE", nargs="+",
                       action="extend", help="training data (any format train accepts; several files mix as "
                                             "train_file does: FILE FILE:0.3)")
    bench.add_argument("--steps", type=_positive_int, default=10, metavar="N",
                       help="timed optimizer steps (default: 10)")
    bench.add_argument("--warmup-steps", dest="bench_warmup_steps", type=_positive_int, default=2, metavar="N",
                       help="optimizer steps before timing starts (default: 2)")
    bench.add_argument("--recipe", default="both", choices=("both",) + ("glmtune", "tutorial"),
                       help="which recipe(s) to run (default: both, side by side)")
    bench.add_argument("--in-process", action="store_true",
                       help="run the recipes in this process instead of one fresh process each")
    bench.add_argument("--json", dest="json_file", default=None, metavar="FILE", help="also write the results as JSON to this file")
    bench.add_argument("--overwrite", dest="overwrite_json", action="store_true",
                       help="replace the --json file if it exists")
    add_arguments(bench, TrainConfig, skip=("train_file", "dev_file", "output_dir", "overwrite", "resume", "max_steps",
                                            "num_train_epochs", "eval_steps", "eval_each_epoch", "eval_on_start",
                                            "metric_for_best", "early_stopping_patience", "eval_max_new_tokens",
                                            "eval_generate", "save_steps", "save_total_limit", "logging_steps",
                                            "save_strategy", "warmup_steps",
                                            "report_to", "max_eval_samples", "eval_batch_size"))
    bench.set_defaults(func=_cmd_bench, leftovers=True)


def _add_data(commands) -> None:
    data = commands.add_parser("data", help="validate, measure and split data files")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    validate = data_commands.add_parser("validate", allow_abbrev=False, help="check a data file, row by row")
    validate.add_argument("file")
    validate.add_argument("--no-answers", action="store_true", help="the rows are prediction inputs (answers optional)")
    _add_column_arguments(validate)
    _add_prompt_template_argument(validate, "none")
    validate.set_defaults(func=_cmd_data_validate)
    stats = data_commands.add_parser("stats", allow_abbrev=False,
                                     help="token lengths and what length limits would cut")
    stats.add_argument("file")
    stats.add_argument("--model", default=DEFAULT_MODEL, help=f"whose tokenizer counts (default: {DEFAULT_MODEL})")
    stats.add_argument("--template", default="auto", choices=TEMPLATE_NAMES, help="prompt format (default: auto)")
    stats.add_argument("--max-source-length", type=_positive_int, default=None)
    stats.add_argument("--max-target-length", type=_positive_int, default=None)
    stats.add_argument("--cutoff-len", type=_positive_int, default=None)
    stats.add_argument("--json", action="store_true", help="print the numbers as JSON")
    stats.add_argument("--train-on", default="all_assistant", choices=("all_assistant", "last_assistant"),
                       help="which answers of a conversation train, as in train (default: all_assistant)")
    _add_column_arguments(stats)
    _add_prompt_template_argument(stats, "none")
    stats.set_defaults(func=_cmd_data_stats)
    split = data_commands.add_parser("split", allow_abbrev=False, help="reproducible train/dev split")
    split.add_argument("file")
    split.add_argument("--dev-ratio", type=float, default=0.1, help="share of rows for dev (default: 0.1)")
    split.add_argument("--seed", type=int, default=42, help="shuffle seed (default: 42)")
    split.add_argument("--output-dir", default=None, help="where to write (default: beside FILE)")
    split.add_argument("--overwrite", action="store_true", help="replace existing output files")
    split.set_defaults(func=_cmd_data_split)


COMMANDS = (_add_train, _add_predict, _add_eval, _add_compare, _add_metrics, _add_chat, _add_serve, _add_webui,
            _add_studio, _add_export, _add_demo, _add_bench, _add_data)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="glmtune", description=__doc__.splitlines()[0], allow_abbrev=False,
                     epilog="Every --multi-word-option may also be written with underscores (--max_new_tokens).")
    parser.add_argument("--version", action="version", version=f"glmtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs (transformers' too)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr,
                        force=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info() if verbose else hf_logging.set_verbosity_error()
    if not verbose:  # library progress bars and deprecation notices are noise to glmtune's users
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes warns at every 8-bit matmul of a float32 input (as on the CPU) that it computes in fp16
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL", "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args, unknown, argv: list[str]) -> int:
    from glmtune.train.distributed import is_main_process, launch, strip_nproc

    flags = [w for w in unknown if w.startswith("-")]
    words = [w for w in unknown if not w.startswith("-")]
    config = config_from_args(TrainConfig, args, words, flags)  # bad options stop here, before any launch
    if args.dry_run:  # in this one process, whatever --nproc says (it only changes the step count)
        from glmtune.train.dry_run import dry_run

        print(dry_run(config, processes=args.nproc).render(), end="")
        return 0
    if args.nproc > 1:  # what can be checked without the model is checked once, here, before any launch
        from glmtune.train.distributed import check_deepspeed
        from glmtune.train.recipe import check_report_to
        from glmtune.train.run_folder import check_output_dir

        if config.deepspeed:
            check_deepspeed(config.deepspeed)
        if config.output_dir:
            check_output_dir(Path(config.output_dir), overwrite=config.overwrite, resume=config.resume, cfg=config)
        check_report_to(config.report_to)
        return launch(args.nproc, strip_nproc(argv))
    if not is_main_process():  # under torchrun: the main process reports, the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    from glmtune.train.trainer import run_training

    result = run_training(config)
    if is_main_process():
        print(f"run written to {result.output_dir} (adapter: {result.adapter_dir})")
    return 0


def _cmd_bench(args, unknown, argv: list[str]) -> int:
    from glmtune.bench.run import RECIPES, BenchSettings, format_table, run_bench

    flags = [w for w in unknown if w.startswith("-")]
    words = [w for w in unknown if not w.startswith("-")]
    config = config_from_args(TrainConfig, args, words, flags)
    if args.json_file:  # before minutes of benchmarking, not after
        from glmtune.files import check_output_file

        from glmtune.data.mixing import train_paths

        check_output_file(args.json_file, overwrite=args.overwrite_json, inputs=train_paths(config.train_file),
                          option="--json")
    recipes = RECIPES if args.recipe == "both" else (args.recipe,)
    summary = run_bench(BenchSettings(config, args.steps, args.bench_warmup_steps, recipes), in_process=args.in_process)
    if args.json_file:
        from glmtune.files import write_text

        write_text(args.json_file, json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print(json.dumps(summary))
    return 0


def _generator(args):
    from glmtune.data.preprocess import LengthLimits
    from glmtune.inference.generate import Generator
    from glmtune.methods.adapter import load_tuned_model

    if getattr(args, "seed", None) is not None:
        from transformers import set_seed

        set_seed(args.seed)
    loaded, info = load_tuned_model(args.model, args.adapter, dtype=args.dtype,
                                    quantization=args.quantization_bit, pre_seq_len=args.pre_seq_len)
    template = args.template or (info or {}).get("template") or "auto"
    limits = LengthLimits(max_source_length=getattr(args, "max_source_length", None))
    return Generator(loaded, template, limits)


def _prompt_template(args, *, typed: bool = False) -> str | None:
    """--prompt-template, else the adapter's; `typed`: for chat, serve and webui, which fill its one field."""
    from glmtune.data.prompt_template import chat_template_field
    from glmtune.methods.adapter import prompt_template_for

    template = prompt_template_for(args.prompt_template, args.adapter, args.model)
    if typed and template:
        chat_template_field(template, "--prompt-template" if args.prompt_template else
                            "the adapter's prompt_template")
    return template


def _cmd_predict(args) -> int:
    from glmtune.data.formats import load_samples
    from glmtune.evaluate.predictions import write_predictions
    from glmtune.files import check_output_file

    # Check the output and read and validate the input before spending time on loading the model.
    check_output_file(args.output, overwrite=args.overwrite, inputs=[args.input])
    samples, _ = load_samples(args.input, prompt_column=args.prompt_column, response_column=args.response_column,
                              require_answer=False, prompt_template=_prompt_template(args))
    answers = write_predictions(_generator(args), samples, args.output, batch_size=args.batch_size,
                                generation=generation_from_args(args))
    print(f"wrote {len(answers)} predictions to {args.output}")
    return 0


def _eval_settings(args):
    from glmtune.evaluate.runs import EvalSettings

    return EvalSettings(data=args.data, output_dir=args.output, model=args.model, adapter=args.adapter,
                        template=args.template, task=args.task, batch_size=args.batch_size,
                        generation=generation_from_args(args), max_samples=args.max_samples,
                        max_source_length=args.max_source_length,
                        dtype=args.dtype, quantization=args.quantization_bit, pre_seq_len=args.pre_seq_len,
                        prompt_column=args.prompt_column, response_column=args.response_column,
                        prompt_template=args.prompt_template)


def _cmd_eval(args) -> int:
    from glmtune.evaluate.metrics import metrics_table
    from glmtune.evaluate.runs import run_eval

    settings = _eval_settings(args)
    metrics = run_eval(settings, overwrite=args.overwrite)
    print(metrics_table(metrics))
    print(f"predictions and metrics written to {settings.output_dir}")
    return 0


def _cmd_compare(args) -> int:
    from glmtune.evaluate.runs import run_compare

    from glmtune.evaluate.report import comparison_table

    report, before, after = run_compare(_eval_settings(args), overwrite=args.overwrite)
    print(comparison_table(before, after))
    print(f"report written to {report}")
    return 0


def _cmd_metrics(args) -> int:
    from glmtune.evaluate.metrics import metrics_table
    from glmtune.evaluate.runs import score_file
    from glmtune.files import check_output_file, write_text

    if args.output:
        check_output_file(args.output, overwrite=args.overwrite, inputs=[args.predictions])
    metrics = score_file(args.predictions, task=args.task)
    print(metrics_table(metrics))
    if args.output:
        write_text(args.output, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return 0


def _cmd_chat(args) -> int:
    from glmtune.serve.chat import chat_loop, read_tools_file
    from glmtune.serve.engine import ChatEngine

    from dataclasses import replace

    template = _prompt_template(args, typed=True)
    tools = read_tools_file(args.tools) if args.tools else None  # before minutes of loading
    # --seed seeds the session once (_generator), not every answer again
    generation = replace(generation_from_args(args), seed=None)
    engine = ChatEngine(_generator(args), generation=generation, prompt_template=template)
    try:
        if tools and engine.tools_unsupported():
            raise GlmtuneError(f"--tools: {engine.tools_unsupported()}")
        chat_loop(engine, keep_history=not args.no_history, system=args.system, generation=generation, tools=tools)
    finally:
        engine.close()
    return 0


def _served_name(args) -> str:
    """What clients and the page title call the model: the run's folder for OUT/adapter or OUT/best."""
    from pathlib import PurePath

    if getattr(args, "served_model_name", None):
        return args.served_model_name
    if args.adapter:
        from glmtune.inference.adapters import run_name

        return run_name(args.adapter)
    return PurePath(args.model).name if args.model else DEFAULT_MODEL


def _serve_key(args) -> str | None:
    """--api-key, else $GLMTUNE_API_KEY (empty: none), after checking it and --allow-origin. A key must be
    printable ASCII without surrounding spaces: HTTP carries headers as bytes (read as Latin-1) and trims
    them, so any other key could never match."""
    import re

    if args.api_key is None:
        key, source = os.environ.get("GLMTUNE_API_KEY") or None, "$GLMTUNE_API_KEY"
    else:
        key, source = args.api_key, "--api-key"
        if not key:
            raise GlmtuneError("--api-key is empty; give a key, or leave the option out for a server without one")
    if key is not None:
        bad = next((c for c in key if not " " <= c <= "~"), None)
        if bad is not None:
            raise GlmtuneError(f"{source} holds {bad!r}; a key must be printable ASCII (letters, digits, punctuation), "
                               "as HTTP headers carry it")
        if key != key.strip():
            raise GlmtuneError(f"{source} starts or ends with a space, which HTTP drops; remove it")
    for origin in args.allow_origin:
        if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin):
            raise GlmtuneError(f"--allow-origin {origin!r} is not an origin: write scheme://host[:port] as a browser "
                               "sends it, e.g. http://localhost:3000 (no path, no trailing slash), or '*'")
    return key


def _serving_engine(args, **options):
    """The engine of serve and webui, and the name of the model it serves first: one model (base, or base +
    one adapter given as a bare folder) as chat and predict load it, or several adapters over one base."""
    from glmtune.inference.adapters import adapter_names, load_served_models, parse_adapter_option
    from glmtune.serve.engine import ChatEngine

    values = args.adapter or []
    batching = {"max_batch": args.max_batch, "max_batch_tokens": args.max_batch_tokens, **options}
    generation = generation_from_args(args)
    if len(values) <= 1 and all(parse_adapter_option(v)[0] is None for v in values):
        args.adapter = values[0] if values else None
        template = _prompt_template(args, typed=True)
        engine = ChatEngine(_generator(args), generation=generation, prompt_template=template, **batching)
        return engine, _served_name(args)
    if args.pre_seq_len is not None:
        raise GlmtuneError("--pre-seq-len is for one official P-Tuning checkpoint served alone (--adapter DIR); "
                           "with several adapters, give glmtune adapters")
    named = adapter_names(values)  # names checked before minutes of loading
    models = load_served_models(args.model, named, dtype=args.dtype, quantization=args.quantization_bit,
                                template=args.template, prompt_template=args.prompt_template)
    if getattr(args, "served_model_name", None):
        models[0].name = args.served_model_name
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise GlmtuneError(f"--served-model-name {models[0].name!r} is also an adapter's name; choose another")
    log.info("serving %s over one copy of the base", ", ".join(names))
    return ChatEngine(generation=generation, models=models, **batching), models[0].name


def _cmd_serve(args) -> int:
    from glmtune.serve.network import allowed_hosts, is_loopback, listen, url
    from glmtune.serve.openai_api import serve

    api_key = _serve_key(args)  # before anything is bound or loaded
    if not api_key and not is_loopback(args.host):
        log.warning("listening on %s without --api-key: anyone who can reach this machine can use the model",
                    args.host)
    sock = listen(args.host, args.port)  # before loading: a taken port fails at once
    engine, name = _serving_engine(args, max_queue=args.max_queue)
    together = f"{engine.batcher.max_batch} requests together" if engine.batcher.max_batch > 1 else "one request at a time"
    print(f"glmtune: answering {together} within "
          f"{engine.max_batch_tokens} cache tokens ({engine.max_batch_tokens * engine.cache_bytes_per_token / 2**20:.0f} "
          f"MiB); up to {args.max_queue} more wait", flush=True)
    print(f"glmtune: serving {name} at {url(args.host, sock.getsockname()[1])}/v1 (OpenAI-compatible; Ctrl-C stops)",
          flush=True)
    serve(engine, name, sock=sock, api_key=api_key, hosts=allowed_hosts(args.host, args.allowed_host),
          allow_origins=tuple(args.allow_origin), max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout,
          log_level="debug" if args.verbose else "warning")
    return 0


def _cmd_webui(args) -> int:
    from glmtune.serve.gradio_page import page_port
    from glmtune.serve.network import url
    from glmtune.serve.webui import launch

    port = page_port("webui", args.host, args.port, "use the chat page")  # a taken port fails before loading
    engine, name = _serving_engine(args)
    launch(engine, host=args.host, port=port, title=name, system=args.system,
           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
           repetition_penalty=args.repetition_penalty,
           announce=lambda: print(f"glmtune: chat page at {url(args.host, port)} (Ctrl-C stops)", flush=True))
    return 0


def _cmd_studio(args) -> int:
    from glmtune.files import check_output_folder
    from glmtune.serve.gradio_page import page_port
    from glmtune.serve.network import url
    from glmtune.studio.app import launch

    check_output_folder(Path(args.runs_dir), option="--runs-dir")
    port = page_port("studio", args.host, args.port, "train and run models here")
    launch(args.runs_dir, host=args.host, port=port,
           announce=lambda: print(f"glmtune: studio at {url(args.host, port)} (runs in {args.runs_dir}; Ctrl-C stops "
                                  "the page, not the runs)", flush=True))
    return 0


def _cmd_export(args) -> int:
    from glmtune.export.run import export_model

    report = export_model(args.adapter, args.output, model=args.model, merge=args.merge, dtype=args.dtype,
                          overwrite=args.overwrite, check=not args.no_check)
    print(report.summary())
    return 0


def _cmd_demo(args) -> int:
    from glmtune.demo import run_demo

    run_demo(model=args.model, output_dir=args.output_dir, max_steps=args.max_steps, dev_samples=args.dev_samples,
             overwrite=args.overwrite)
    return 0


def _data_columns(args) -> dict:
    """The column options of `glmtune data validate` and `stats`, --prompt-template checked."""
    columns = {"prompt_column": args.prompt_column, "response_column": args.response_column}
    if args.prompt_template:
        from glmtune.data.prompt_template import check_template

        columns["prompt_template"] = check_template(args.prompt_template, "--prompt-template")
    return columns


def _cmd_data_validate(args) -> int:
    from glmtune.data.formats import load_samples

    samples, fmt = load_samples(args.file, require_answer=not args.no_answers, **_data_columns(args))
    turns = sum(sum(m.role == "assistant" and m.trainable for m in s.messages) for s in samples)
    calls = sum(len(m.tool_calls) for s in samples for m in s.messages)
    tools = f", {calls} tool calls in {sum(any(m.tool_calls for m in s.messages) for s in samples)} samples" * bool(calls)
    print(f"{args.file}: OK, {len(samples)} samples ({fmt.name} format, {turns} trained answers{tools})")
    return 0


def _cmd_data_split(args) -> int:
    from glmtune.data.split import split_file

    train, dev, n_train, n_dev = split_file(args.file, dev_ratio=args.dev_ratio, seed=args.seed,
                                            output_dir=args.output_dir, overwrite=args.overwrite)
    print(f"{n_train} rows -> {train}\n{n_dev} rows -> {dev}")
    return 0


def _cmd_data_stats(args) -> int:
    from glmtune.data.preprocess import LengthLimits
    from glmtune.data.stats import file_stats
    from glmtune.models.loader import load_tokenizer, stop_token_ids

    def tokenizer():
        loaded, family, _ = load_tokenizer(args.model)
        return loaded, family, stop_token_ids(loaded)

    limits = LengthLimits(args.max_source_length, args.max_target_length, args.cutoff_len)
    print(file_stats(args.file, tokenizer, template=args.template, limits=limits, as_json=args.json,
                     model_name=args.model, train_on=args.train_on, **_data_columns(args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    leftovers = getattr(args, "leftovers", False)  # set by train and bench only
    if unknown and not leftovers:
        parser.parse_args(argv)  # let argparse print its usage error (exit 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # glmtune never downloads; fail fast instead of waiting
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from glmtune.models.kbit import hold_back_bitsandbytes, release_bitsandbytes

    held = hold_back_bitsandbytes()  # imported only where a bitsandbytes base is used (see glmtune.models.kbit)
    try:
        _setup_logging(args.verbose)
        return args.func(args, unknown, argv) if leftovers else args.func(args)
    except (GlmtuneError, OSError, RuntimeError, MemoryError) as e:
        if isinstance(e, (RuntimeError, MemoryError)):  # torch.OutOfMemoryError is a RuntimeError
            from glmtune.oom import last_resort_message

            message = last_resort_message(e, args.command)
            if message is None:  # any other error is a bug: keep its traceback
                raise
            e = GlmtuneError(message)
        if isinstance(e, OSError):
            if e.errno != errno.ENAMETOOLONG:  # any other OSError is a bug: keep its traceback
                raise
            from glmtune.files import path_error

            # Only a name the user gave (or one made from it) can be too long: say which, on one line.
            e = (path_error(e.filename, e) if e.filename
                 else GlmtuneError("a file name is too long for the file system"))
        rank = os.environ.get("RANK", "0")  # under torchrun every process checks, and may say so
        prefix = f"{ERROR_PREFIX}{'' if rank in ('', '0') else f'(rank {rank}) '}"
        # Every line of a message that lists several problems starts with the prefix, the last one too.
        print("\n".join(prefix + line for line in str(e).splitlines() or [""]), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nglmtune: interrupted", file=sys.stderr)
        return 130
    finally:
        if held:
            release_bitsandbytes()


if __name__ == "__main__":
    raise SystemExit(main())
