"""Shared fixtures: the default model's tokenizer and a tiny random model built from a config.

Tests keep glmtune's cache inside the project (.pytest_cache/glmtune) so they never touch the user's
cache; the default model is converted once per fresh checkout (about 30 s) and reused after that.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true, as .ci/run sets it) every test must run: a skip, for a missing ../shared, chromium or
    package, is turned into a failure that gives the skip's reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache():
    os.environ["GLMTUNE_CACHE"] = str(ROOT / ".pytest_cache" / "glmtune")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


@pytest.fixture(scope="session")
def default_model_dir(_isolated_cache) -> Path:
    from glmtune.models.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir, tokenizer) -> Path:
    """A 2-layer Llama (grouped-query attention) with random weights and the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.2)  # large enough that a few LoRA steps move the loss clearly
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name) -> path; rows may be dicts or raw strings (written as they are)."""

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


@pytest.fixture
def sample_files() -> tuple[Path, Path]:
    from glmtune.paths import sample_data_dir

    return sample_data_dir() / "train.jsonl", sample_data_dir() / "dev.jsonl"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """12 training and 4 dev rows of the sample dataset (both tasks)."""
    from glmtune.paths import sample_data_dir

    folder = tmp_path_factory.mktemp("small-data")
    train_rows = (sample_data_dir() / "train.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    dev_rows = (sample_data_dir() / "dev.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    (folder / "train.jsonl").write_text("\n".join(train_rows) + "\n", encoding="utf-8")
    (folder / "dev.jsonl").write_text("\n".join(dev_rows) + "\n", encoding="utf-8")
    return folder / "train.jsonl", folder / "dev.jsonl"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, small_data):
    """A short LoRA run on the tiny model (TrainResult, with the trained model still in memory)."""
    from glmtune.config import TrainConfig
    from glmtune.train.trainer import run_training

    train, dev = small_data
    config = TrainConfig(model=str(tiny_model_dir), train_file=str(train), dev_file=str(dev),
                         output_dir=str(tmp_path_factory.mktemp("run") / "out"), max_steps=12, batch_size=4,
                         learning_rate=3e-2, lora_target="all-linear", logging_steps=1, eval_steps=6, eval_each_epoch=False,
                         save_steps=6, eval_on_start=True, warmup_ratio=0.0)
    return run_training(config)


@pytest.fixture
def check_checkpointing():
    """check(model, batch): the loss and every gradient are the same with gradient checkpointing on."""

    def loss_and_grads(model, batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def check(model, batch):
        import torch

        plain_loss, plain_grads = loss_and_grads(model, batch)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.transformer.gradient_checkpointing
        ckpt_loss, ckpt_grads = loss_and_grads(model, batch)
        assert abs(plain_loss - ckpt_loss) < 1e-6
        assert plain_grads and plain_grads.keys() == ckpt_grads.keys()
        for name, grad in plain_grads.items():
            assert torch.allclose(grad, ckpt_grads[name], atol=1e-5), name
        return ckpt_grads

    return check


@pytest.fixture(scope="session")
def train_tiny():
    """train(model_dir, (train, dev), out, **options) -> TrainResult: a short run with per-step logging."""
    from glmtune.config import TrainConfig
    from glmtune.train.trainer import run_training

    def train(model_dir, data, out, **options):
        train_file, dev_file = data
        settings = dict(model=str(model_dir), train_file=str(train_file),
                        dev_file=str(dev_file) if dev_file else None, output_dir=str(out), max_steps=8,
                        batch_size=4, logging_steps=1, eval_each_epoch=False, eval_on_start=bool(dev_file),
                        save_steps=8)
        settings.update(options)
        return run_training(TrainConfig(**settings))

    return train


def logged(run_dir, key):
    """Every value of `key` in a run's train_log.jsonl, in order."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


@pytest.fixture(scope="session")
def log_values():
    return logged


# ---------------------------------------------------------------------------------------------------------
# Tiny random checkpoints of every family, for the method-by-family tests

GLM4_SPECIAL_TOKENS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                       "<|endoftext|>"]
# GLM-4's chat template reduced to plain messages (the real one also renders tools): [gMASK]<sop>, then
# <|role|>\n{content} per message, <|assistant|> to ask for an answer.
GLM4_CHAT_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chatglm_tokenizer_dir(name: str) -> Path:
    from glmtune.paths import shared_dir

    folder = shared_dir() / "fixtures" / "tokenizers" / name
    vocabulary = "ice_text.model" if name == "chatglm-6b" else "tokenizer.model"
    if not (folder / vocabulary).is_file():
        pytest.skip(f"{name} tokenizer fixture not found under {folder} (set GLMTUNE_SHARED)")
    return folder


def _tiny_chatglm(folder: Path) -> Path:
    """A 2-layer ChatGLM-6B with random weights and the real 130k vocabulary and tokenizer."""
    import torch
    from glmtune.models.chatglm.configuration import ChatGLMConfig
    from glmtune.models.chatglm.modeling import ChatGLMForConditionalGeneration

    tokenizer = chatglm_tokenizer_dir("chatglm-6b")
    torch.manual_seed(0)
    config = ChatGLMConfig(vocab_size=130528, hidden_size=64, num_layers=2, num_attention_heads=4,
                           inner_hidden_size=128, max_sequence_length=1024, initializer_range=0.1)
    ChatGLMForConditionalGeneration(config).save_pretrained(folder)
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder)
    return folder


def _tiny_chatglm2(folder: Path, family: str) -> Path:
    """A 2-layer ChatGLM2 / ChatGLM3 (multi-query, 2 groups) with random weights and the real tokenizer."""
    import torch
    from glmtune.models.chatglm2.configuration import ChatGLM2Config
    from glmtune.models.chatglm2.modeling import ChatGLM2ForConditionalGeneration

    tokenizer = chatglm_tokenizer_dir("chatglm2-6b")
    torch.manual_seed(0)
    config = ChatGLM2Config(num_layers=2, padded_vocab_size=65024, hidden_size=64, ffn_hidden_size=96,
                            kv_channels=16, num_attention_heads=4, multi_query_attention=True,
                            multi_query_group_num=2, add_qkv_bias=True, seq_length=1024, initializer_range=0.1)
    ChatGLM2ForConditionalGeneration(config).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["_name_or_path"] = f"THUDM/{family}-6b"  # how the loader tells ChatGLM3 from ChatGLM2
    (folder / "config.json").write_text(json.dumps(saved))
    shutil.copy(tokenizer / "tokenizer.model", folder)
    shutil.copy(tokenizer / f"tokenizer_config.{family}.json", folder / "tokenizer_config.json")
    return folder


def _tiny_glm4(folder: Path, tokenizer) -> Path:
    """A 2-layer GLM-4 (transformers' glm4: grouped-query attention, head_dim not hidden/heads, partial
    rotary) with random weights, and a tokenizer carrying GLM-4's special tokens, chat template and stop
    tokens (the default model's vocabulary underneath)."""
    import copy

    import torch
    from transformers import Glm4Config, Glm4ForCausalLM, GenerationConfig

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": GLM4_SPECIAL_TOKENS})
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = GLM4_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    config = Glm4Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=1024,
                        pad_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|endoftext|>"),
                        initializer_range=0.2)
    Glm4ForCausalLM(config).save_pretrained(folder)
    GenerationConfig(eos_token_id=[ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")],
                     pad_token_id=ids("<|endoftext|>")).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """tiny_family_dir(family) -> a checkpoint folder of a tiny random model of that family (built once);
    skips where a ChatGLM tokenizer fixture is missing."""
    built: dict[str, Path] = {"generic": tiny_model_dir}

    def folder(family: str) -> Path:
        if family not in built:
            target = tmp_path_factory.mktemp(f"tiny-{family}")
            if family == "chatglm":
                built[family] = _tiny_chatglm(target)
            elif family in ("chatglm2", "chatglm3"):
                built[family] = _tiny_chatglm2(target, family)
            elif family == "glm4":
                built[family] = _tiny_glm4(target, tokenizer)
            else:
                raise ValueError(family)
        return built[family]

    return folder


# ---------------------------------------------------------------------------------------------------------
# adapters written as the trainer writes them, without training

def make_lora_adapter(base: Path, out: Path, *, template: str = "auto", quantization=0, seed: int = 1) -> Path:
    """A glmtune LoRA adapter written the way the trainer writes one, with random (non-zero) B matrices so
    that merging changes every adapted weight."""
    import torch
    from peft import LoraConfig, get_peft_model

    from glmtune.methods.adapter import write_adapter_info
    from glmtune.methods.lora import LoraMethod, fit_quantized, target_modules
    from glmtune.models.loader import fingerprint, load_model

    loaded = load_model(str(base), quantization=quantization)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=target_modules("auto" if loaded.family != "generic" else "all-linear",
                                                      loaded.family))
    torch.manual_seed(seed)
    model = get_peft_model(loaded.model, fit_quantized(loaded.model, config))
    with torch.no_grad():  # B at peft's random init is large; keep the update a realistic fraction of W
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)
    out.mkdir(parents=True)
    LoraMethod().save(model, out)
    method = "qlora" if loaded.quantization.backend == "bitsandbytes" else "lora"
    write_adapter_info(out, method=method, family=loaded.family, base_model=str(base),
                       fingerprint=fingerprint(loaded.model.config), template=template,
                       parameters={"rank": 4, "alpha": 8, "dropout": 0.0, "target": "auto"},
                       extra={"quantization_bit": loaded.quantization_bit, "quantization": loaded.quantization.record()})
    return out


def make_ptuning_adapter(base: Path, out: Path, *, projection: bool = True) -> Path:
    """A glmtune P-Tuning v2 adapter (a 4-token prefix) as the trainer writes one, untrained."""
    from types import SimpleNamespace

    import torch

    from glmtune.methods.adapter import write_adapter_info
    from glmtune.methods.ptuning import PTuningMethod
    from glmtune.models.loader import fingerprint, load_model

    loaded = load_model(str(base))
    options = SimpleNamespace(pre_seq_len=4, prefix_projection=projection, prefix_hidden_size=32)
    method = PTuningMethod()
    torch.manual_seed(2)
    model = method.apply(loaded.model, options, loaded.family)
    out.mkdir(parents=True)
    method.save(model, out)
    write_adapter_info(out, method="ptuning", family=loaded.family, base_model=str(base),
                       fingerprint=fingerprint(loaded.model.config), template="auto",
                       parameters=method.parameters(options, loaded.family),
                       extra={"quantization_bit": 0, "quantization": loaded.quantization.record()})
    return out


@contextlib.contextmanager
def api_in_thread(engine, **options):
    """glmtune's API over `engine` on a free loopback port for the with-block (uvicorn in a thread, loopback
    hosts unless `options` say otherwise); yields its base URL."""
    from glmtune.serve.network import allowed_hosts, listen
    from glmtune.serve.openai_api import make_server

    sock = listen("127.0.0.1", 0)
    server = make_server(engine, "tiny", **{"hosts": allowed_hosts("127.0.0.1"), **options})
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def _glmtune_running(args: list[str], ready: str, timeout: float = 180):
    """Runs `python -m glmtune ARGS` for the length of the with-block and yields the first match of the
    regex `ready` in its output (e.g. the URL a server prints). Fails with the output if the command exits
    or prints no match in time; always stops it at the end (SIGTERM, then SIGKILL)."""
    process = subprocess.Popen([sys.executable, "-m", "glmtune", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    lines: list[str] = []
    found: list[re.Match] = []
    seen = threading.Event()

    def read():  # a thread of its own, so waiting for the line can time out
        for line in process.stdout:
            lines.append(line)
            if not found and (match := re.search(ready, line)):
                found.append(match)
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not seen.wait(0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                reader.join(timeout=2)
                what = f"exited with {process.returncode}" if process.poll() is not None else f"printed no {ready!r}"
                pytest.fail(f"glmtune {' '.join(args)} {what}; its output:\n{''.join(lines)}")
        yield found[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)


@pytest.fixture(scope="session")
def glmtune_running():
    """glmtune_running(args, ready_regex) -> a context manager running the command (see _glmtune_running)."""
    return _glmtune_running


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes' two CPU code paths, on any CPU

@pytest.fixture(params=["standard", "avx512_bf16"])
def bitsandbytes_cpu_path(request, monkeypatch):
    """Runs a test under each code path bitsandbytes takes on a CPU, whatever this CPU is.

    A bitsandbytes 4-bit layer asks, when it is built, whether the CPU has AVX-512 BF16; if so, its first
    forward pass in eval mode without gradients repacks its weight in place into a CPU-only layout.
    'avx512_bf16' makes every layer built during the test believe the CPU has it, 'standard' that it has not.
    Where the CPU really lacks the instruction, a layer that repacks anyway multiplies the repacked bytes with
    bitsandbytes' default kernel and answers wrongly, so a test sees a repacked layer either way (on a CPU
    with the instruction: its merge or saved weights come out wrong)."""
    modules = pytest.importorskip("bitsandbytes.nn.modules", reason="bitsandbytes is not installed (make setup "
                                  "installs it)")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: request.param == "avx512_bf16")
    return request.param


# ---------------------------------------------------------------------------------------------------------
# A real browser (the web UI's and the studio's browser tests)

@pytest.fixture
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip saying what is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed")

    def first(*candidates):
        return next((p for p in candidates if p and os.path.exists(p)), None)

    chromium = first(shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
    driver = first(shutil.which("chromedriver"), "/usr/bin/chromedriver")
    if not chromium or not driver:
        pytest.skip(f"a real-browser test needs chromium and chromedriver; found {chromium or 'no chromium'}, "
                    f"{driver or 'no chromedriver'}")
    return chromium, driver


def headless_chrome(paths: tuple[str, str], profile, size: str = "1200,900"):
    """A headless Chromium driven by selenium, with a fresh profile and nothing that reaches the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-default-apps",
                     f"--user-data-dir={profile}", f"--window-size={size}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
