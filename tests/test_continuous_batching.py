"""Continuous batching (glmtune.inference.batching) and several adapters over one base (inference.adapters):
every answer is exactly what it would be alone, whatever else shares the batch, on every family."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_lora_adapter, make_ptuning_adapter

from glmtune.config import GenerationOptions
from glmtune.data.formats import Message
from glmtune.inference.batching import ContinuousBatcher, Sampling, Sequence
from glmtune.serve.engine import BadRequest, ChatEngine, ChatRequest, Finished, UnknownModel

FAMILIES = ["generic", "chatglm", "chatglm2", "chatglm3", "glm4"]
QUESTIONS = ["你好", "Tell me a story about a cat and a dog, please, with a happy end.", "1+1=?",
             "What is the capital of France? Answer in one word.", "写一首关于春天的诗。"]


def run(batcher: ContinuousBatcher, sequences: list[Sequence], *, stagger: bool = True) -> dict[int, list[int]]:
    """Drives the batcher until every sequence ended; with `stagger` one joins per step. Returns each
    sequence's tokens by its index, and checks that every step's batch stays within the batcher's bounds."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(sequences))}
    index = {id(s): i for i, s in enumerate(sequences)}
    pending = list(sequences)
    while pending or batcher.busy:
        while pending and batcher.fits(pending[0]):
            batcher.add(pending.pop(0))
            if stagger:
                break
        batcher.peak = max(getattr(batcher, "peak", 0), len(batcher.sequences))  # sequences running together
        assert len(batcher.sequences) <= batcher.max_batch
        assert batcher.max_tokens is None or batcher.reserved() <= batcher.max_tokens
        produced, failures = batcher.step()
        assert not failures
        if batcher.max_tokens is not None and batcher.columns is not None:
            assert batcher.columns.numel() <= batcher.max_tokens  # the cache really held: rows x columns
        for sequence, token in produced:
            tokens[index[id(sequence)]].append(token)
    return tokens


def alone(model, stop_ids, prompt, length, sampling=Sampling(), route=None, **options) -> list[int]:
    batcher = ContinuousBatcher(model, stop_ids=stop_ids, **options)
    extra = {"route": route} if route is not None else {}
    return run(batcher, [Sequence(prompt, length, sampling, **extra)])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_staggered_sequences_answer_as_alone_and_as_transformers_generate(tiny_family_dir, family):
    """Five prompts of different lengths join one per step, with different answer lengths; each gets the tokens
    it gets alone and the tokens transformers' generate gives (the stop token included, nothing after it). A
    small prefill chunk cuts the longer prompts into several chunks (ChatGLM-6B's prompt is prefilled whole)."""
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    generator = Generator(load_model(str(tiny_family_dir(family))))
    model, stops = generator.loaded.model, generator.stop_ids
    prompts = [generator.prompt_ids([Message("user", q)]) for q in QUESTIONS]
    lengths = [12, 5, 9, 1, 12]
    batcher = ContinuousBatcher(model, stop_ids=stops, prefill_chunk=8)
    together = run(batcher, [Sequence(p, n) for p, n in zip(prompts, lengths)])
    assert batcher.peak >= 2  # they really decoded together
    for i, (question, prompt, length) in enumerate(zip(QUESTIONS, prompts, lengths)):
        expected = generator.generate_ids([[Message("user", question)]], GenerationOptions(max_new_tokens=length))[0]
        assert together[i] == alone(model, stops, prompt, length, prefill_chunk=8) == expected, (family, i)
    assert max(len(p) for p in prompts) > 8  # some prompt was chunked


def test_sampling_settings_are_per_sequence_and_a_seed_gives_the_same_answer_in_any_batch(tiny_model_dir):
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    generator = Generator(load_model(str(tiny_model_dir)))
    model, stops = generator.loaded.model, set()  # no stop: every answer runs its full length
    prompt = generator.prompt_ids([Message("user", QUESTIONS[1])])
    settings = [Sampling(), Sampling(temperature=1.0, seed=7), Sampling(temperature=0.7, top_p=0.5, seed=8),
                Sampling(repetition_penalty=1.5), Sampling(temperature=1.0, seed=9, repetition_penalty=1.3)]
    batcher = ContinuousBatcher(model, stop_ids=stops)
    together = run(batcher, [Sequence(prompt, 16, s) for s in settings])
    by_itself = [alone(model, stops, prompt, 16, s) for s in settings]
    assert together == dict(enumerate(by_itself))
    # sampling did change the answers (a random tiny model's greedy answer may repeat nothing, so a penalty alone
    # may not)
    assert len({tuple(together[i]) for i in (0, 1, 2, 4)}) == 4
    # greedy with a repetition penalty is transformers' own greedy with that penalty
    expected = generator.generate_ids([[Message("user", QUESTIONS[1])]],
                                      GenerationOptions(max_new_tokens=16, repetition_penalty=1.5))[0]
    assert together[3][:len(expected)] == expected


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(tiny_model_dir):
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    generator = Generator(load_model(str(tiny_model_dir)))
    model = generator.loaded.model
    short = generator.prompt_ids([Message("user", "hi")])
    long = generator.prompt_ids([Message("user", "word " * 200)])
    batcher = ContinuousBatcher(model, stop_ids=set(), prefill_chunk=32)
    first, second = Sequence(short, 30), Sequence(long, 4)
    batcher.add(first)
    batcher.step()
    batcher.add(second)
    steps_while_prefilling = 0
    while second in batcher.joining:
        produced, _ = batcher.step()
        assert [s for s, _ in produced if s is first]  # the running answer got its token in this step too
        steps_while_prefilling += 1
    assert steps_while_prefilling >= len(long) // 32  # one chunk per step
    while batcher.busy:
        batcher.step()
    assert first.tokens[len(short):] == alone(model, set(), short, 30, prefill_chunk=32)
    assert second.tokens[len(long):] == alone(model, set(), long, 4, prefill_chunk=32)


def test_the_token_bound_makes_sequences_wait_and_holds(tiny_model_dir):
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    generator = Generator(load_model(str(tiny_model_dir)))
    prompts = [generator.prompt_ids([Message("user", q)]) for q in QUESTIONS]
    longest = max(len(p) for p in prompts) + 10
    batcher = ContinuousBatcher(generator.loaded.model, stop_ids=set(), max_tokens=2 * longest)
    sequences = [Sequence(p, 10) for p in prompts]
    run(batcher, sequences, stagger=False)  # checks the bound at every step
    assert batcher.peak == 2 and all(s.finished == "length" for s in sequences)


# -- the engine ---------------------------------------------------------------------------------------------

def collect(engine: ChatEngine, requests: list[ChatRequest], cancel_after: dict[int, int] | None = None):
    """Submits all requests at once; returns each one's (text, Finished). `cancel_after`: request index -> cancel
    it after that many text pieces."""
    results: dict[int, list] = {i: [] for i in range(len(requests))}
    done = threading.Semaphore(0)
    jobs = []
    for i, request in enumerate(requests):
        def deliver(event, i=i):
            results[i].append(event)
            pieces = sum(isinstance(e, str) for e in results[i])
            if cancel_after and i in cancel_after and pieces == cancel_after[i]:
                jobs[i].cancel()
            if isinstance(event, Finished):
                done.release()
        jobs.append(engine.prepare(request, deliver))
    for job in jobs:
        engine.submit(job)
    for _ in requests:
        assert done.acquire(timeout=120)
    return [("".join(e for e in results[i] if isinstance(e, str)), results[i][-1]) for i in range(len(requests))]


def test_concurrent_requests_each_get_what_they_get_alone(tiny_model_dir, tokenizer):
    """Different lengths, stop strings, sampling and a cancellation, all in one batch."""
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    engine = ChatEngine(Generator(load_model(str(tiny_model_dir)), "plain"),
                        generation=GenerationOptions(max_new_tokens=24))
    try:
        greedy = GenerationOptions(max_new_tokens=24)
        reference = [text for text, _ in collect(engine, [ChatRequest([Message("user", q)], greedy)
                                                          for q in QUESTIONS])]
        stop = next(w for w in reference[1].split() if len(w) > 2 and reference[1].count(w) == 1)
        requests = [
            ChatRequest([Message("user", QUESTIONS[0])], GenerationOptions(max_new_tokens=3)),
            ChatRequest([Message("user", QUESTIONS[1])], greedy, stop=[stop]),
            ChatRequest([Message("user", QUESTIONS[2])], GenerationOptions(max_new_tokens=24, temperature=1.0,
                                                                            seed=11)),
            ChatRequest([Message("user", QUESTIONS[3])], greedy),
            ChatRequest([Message("user", QUESTIONS[4])], greedy),
        ]
        by_itself = [collect(engine, [r])[0] for r in requests]
        together = collect(engine, requests, cancel_after={4: 2})
        for i in range(4):
            assert together[i] == by_itself[i], i
        assert by_itself[1][0] == reference[1][:reference[1].index(stop)].rstrip()
        assert by_itself[1][1].finish_reason == "stop"
        assert by_itself[0][1].completion_tokens == 3 and by_itself[0][1].finish_reason == "length"
        assert together[4][1].finish_reason == "cancelled" and reference[4].startswith(together[4][0])
        assert engine.running == 0 and engine.waiting == 0
    finally:
        engine.close()


def test_a_request_larger_than_the_cache_bound_is_refused_and_cut_when_no_length_was_asked(tiny_model_dir):
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    engine = ChatEngine(Generator(load_model(str(tiny_model_dir)), "plain"), max_batch_tokens=64,
                        generation=GenerationOptions(max_new_tokens=500))
    try:
        with pytest.raises(BadRequest, match="--max-batch-tokens") as caught:
            engine.prepare(ChatRequest([Message("user", "hi")], GenerationOptions(max_new_tokens=100)), print)
        assert caught.value.param == "max_tokens"
        job = engine.prepare(ChatRequest([Message("user", "hi")]), print)
        assert len(job.prompt_ids) + job.generation.max_new_tokens == 64
        with pytest.raises(BadRequest, match="more than this server's cache"):
            engine.prepare(ChatRequest([Message("user", "word " * 80)]), print)
    finally:
        engine.close()


# -- several adapters over one base ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters and a P-Tuning one over the tiny transformers model."""
    folder = tmp_path_factory.mktemp("served-adapters")
    return {"lora-a": make_lora_adapter(tiny_model_dir, folder / "a", seed=1),
            "lora-b": make_lora_adapter(tiny_model_dir, folder / "b", seed=3),
            "prefix": make_ptuning_adapter(tiny_model_dir, folder / "p")}


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters):
    from glmtune.inference.adapters import load_served_models

    models = load_served_models(str(tiny_model_dir), list((n, str(d)) for n, d in adapters.items()))
    engine = ChatEngine(generation=GenerationOptions(max_new_tokens=10), models=models)
    yield engine
    engine.close()


def _single(model_dir, adapter=None):
    """The adapter loaded the usual way (LoRA merged, the prefix in the model): what predict answers."""
    from glmtune.inference.generate import Generator
    from glmtune.methods.adapter import load_tuned_model

    loaded, info = load_tuned_model(str(model_dir), adapter)
    return Generator(loaded, (info or {}).get("template") or "auto")


def test_adapters_in_one_batch_answer_as_each_does_alone_over_one_copy_of_the_base(served, adapters,
                                                                                     tiny_model_dir):
    names = ["base", "lora-a", "lora-b", "prefix"]
    assert served.model_names == names
    base_weights = {p.data_ptr() for p in served.generator.loaded.model.parameters()}
    assert all(m.generator.loaded.model is served.generator.loaded.model for m in served.models.values())
    requests = [ChatRequest([Message("user", q)], GenerationOptions(max_new_tokens=10), model=name)
                for q in QUESTIONS[:2] for name in names]
    together = collect(served, requests)
    by_itself = [collect(served, [r])[0] for r in requests]
    assert together == by_itself
    answers = {}
    for request, (text, finished) in zip(requests, together):
        generator = _single(tiny_model_dir, adapters.get(request.model))
        question = request.messages[0].content
        ids = generator.generate_ids([[Message("user", question)]], GenerationOptions(max_new_tokens=10))[0]
        assert text == generator.generate([[Message("user", question)]],
                                          GenerationOptions(max_new_tokens=10))[0], request.model
        assert finished.completion_tokens == len(ids) - (ids[-1] in generator.stop_ids)
        answers[(request.model, question)] = tuple(ids)
    for question in QUESTIONS[:2]:  # every adapter changed the answer: each row really ran under its own
        assert len({answers[(name, question)] for name in names}) == len(names)
    assert len(base_weights) == len({p.data_ptr() for p in served.generator.loaded.model.parameters()})


def test_an_unknown_model_is_refused(served):
    with pytest.raises(UnknownModel, match="'nope' not found"):
        served.prepare(ChatRequest([Message("user", "hi")], model="nope"), print)


def test_the_api_lists_the_adapters_picks_one_by_model_and_answers_404_for_others(served):
    import httpx
    from conftest import api_in_thread

    with api_in_thread(served) as base:
        listed = httpx.get(base + "/v1/models", timeout=10).json()
        assert [m["id"] for m in listed["data"]] == ["base", "lora-a", "lora-b", "prefix"]
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "model": "lora-b"}
        reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["model"] == "lora-b"
        expected = collect(served, [ChatRequest([Message("user", "hi")], GenerationOptions(max_new_tokens=4),
                                                model="lora-b")])[0][0]
        assert reply.json()["choices"][0]["message"]["content"] == expected
        missing = httpx.post(base + "/v1/chat/completions", json={**body, "model": "gpt-4"}, timeout=60)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found" and missing.json()["error"]["param"] == "model"
        assert httpx.get(base + "/v1/models/gpt-4", timeout=10).status_code == 404
        assert httpx.get(base + "/v1/models/prefix", timeout=10).json()["id"] == "prefix"


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_a_native_chatglm_prefix_served_beside_the_base_answers_as_loaded_alone(tiny_family_dir, tmp_path, family):
    from glmtune.inference.adapters import load_served_models

    base = tiny_family_dir(family)
    adapter = make_ptuning_adapter(base, tmp_path / "prefix")
    engine = ChatEngine(generation=GenerationOptions(max_new_tokens=8),
                        models=load_served_models(str(base), [("prefix", str(adapter))]))
    try:
        requests = [ChatRequest([Message("user", q)], GenerationOptions(max_new_tokens=8), model=name)
                    for q in QUESTIONS[:3] for name in ("base", "prefix")]
        together = collect(engine, requests)
        assert engine.generator.loaded.model.transformer.prefix_encoder is None  # the base stayed plain
        for request, (text, _) in zip(requests, together):
            generator = _single(base, adapter if request.model == "prefix" else None)
            assert text == generator.generate([[request.messages[0]]], GenerationOptions(max_new_tokens=8))[0]
    finally:
        engine.close()


def test_adapter_options_are_parsed_and_checked_before_loading():
    from glmtune.errors import GlmtuneError
    from glmtune.inference.adapters import adapter_names

    assert adapter_names(["a=runs/x/adapter", "runs/y/adapter", "runs/z/best", "plain"]) == [
        ("a", "runs/x/adapter"), ("y", "runs/y/adapter"), ("z", "runs/z/best"), ("plain", "plain")]
    for values, words in [(["base=x"], "bare base"), (["a=x", "a=y"], "twice"), (["a b=x"], "letters"),
                          (["a="], "folder after")]:
        with pytest.raises(GlmtuneError, match=words):
            adapter_names(values)


def test_webui_picks_the_adapter(served):
    from glmtune.serve.webui import Chat

    chat = Chat(served)
    shown = list(chat.respond("hi", [], [], 4, 0.0, 1.0, model="lora-a"))[-1][1]
    expected = collect(served, [ChatRequest([Message("user", "hi")], GenerationOptions(max_new_tokens=4),
                                            model="lora-a")])[0][0]
    assert shown[-1]["content"] == (expected or "(no answer)")
    assert torch.is_tensor(next(served.generator.loaded.model.parameters()))


@pytest.mark.parametrize("family", ["generic", "chatglm3"])
def test_a_shared_head_is_computed_once_and_answers_stay_the_same(tiny_family_dir, family):
    """Prompts that start with the served model's head reuse its keys and values, and the rest of the prompts that
    arrive together run in one forward; the answers are those of a fresh batcher that had to compute the head,
    and of transformers' generate."""
    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model
    from glmtune.serve.engine import shared_head

    generator = Generator(load_model(str(tiny_family_dir(family))), "chat" if family == "generic" else "auto")
    head = shared_head(generator)
    assert len(head) >= 2
    prompts = [generator.prompt_ids([Message("user", q)]) for q in QUESTIONS]
    assert all(p[:len(head)] == head for p in prompts)
    batcher = ContinuousBatcher(generator.loaded.model, stop_ids=generator.stop_ids)
    together = run(batcher, [Sequence(p, 8, head=len(head)) for p in prompts], stagger=False)
    assert batcher.head_hits == len(prompts) - 1
    assert batcher.prefilled_together == len(prompts)  # all the rest of their prompts in one padded forward
    for i, (question, prompt) in enumerate(zip(QUESTIONS, prompts)):
        fresh = ContinuousBatcher(generator.loaded.model, stop_ids=generator.stop_ids)
        assert together[i] == run(fresh, [Sequence(prompt, 8, head=len(head))])[0] and fresh.head_hits == 0
        assert together[i] == generator.generate_ids([[Message("user", question)]],
                                                     GenerationOptions(max_new_tokens=8))[0]


def test_serve_command_serves_named_adapters_beside_the_base(glmtune_running, tiny_model_dir, adapters, served):
    import httpx

    with glmtune_running(["serve", "--model", str(tiny_model_dir), "--port", "0", "--max-batch", "4",
                          "--adapter", f"lora-a={adapters['lora-a']}", "--adapter", f"prefix={adapters['prefix']}"],
                         r"serving \S+ at (http://\S+)/v1") as ready:
        base = ready.group(1)
        for _ in range(100):  # the socket accepts at once; the app may still be starting
            try:
                listed = httpx.get(base + "/v1/models", timeout=10).json()
                break
            except httpx.HTTPError:
                threading.Event().wait(0.1)
        assert [m["id"] for m in listed["data"]] == ["base", "lora-a", "prefix"]
        for name in ("lora-a", "prefix", "base"):
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "model": name}
            reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
            expected = collect(served, [ChatRequest([Message("user", "hi")], GenerationOptions(max_new_tokens=5),
                                                    model=name)])[0][0]
            assert reply["model"] == name and reply["choices"][0]["message"]["content"] == expected
        assert httpx.get(base + "/health", timeout=10).json()["models"] == ["base", "lora-a", "prefix"]


@pytest.mark.parametrize("options, words", [
    (["--adapter", "a=/nowhere/x", "--adapter", "a=/nowhere/y"], "given twice"),
    (["--adapter", "base=/nowhere/x"], "bare base model's name"),
    (["--adapter", "a=/nowhere/x", "--pre-seq-len", "8"], "--pre-seq-len is for one official"),
    (["--adapter", "a=/nowhere/x"], "adapter folder /nowhere/x does not exist"),
])
def test_adapter_and_batching_options_that_cannot_work_are_one_line_errors(capsys, options, words):
    from glmtune.cli import main

    assert main(["serve", "--port", "0", *options]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("glmtune: error: "), err


@pytest.mark.parametrize("change, words", [({"use_dora": True}, "uses DoRA"),
                                           ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                           ({"lora_bias": True}, "lora_bias")])
def test_lora_adapters_several_adapters_cannot_serve_are_refused_by_name(adapters, tmp_path, change, words):
    import json
    import shutil

    from glmtune.errors import GlmtuneError
    from glmtune.inference.multi_lora import MultiLora

    folder = tmp_path / "adapter"
    shutil.copytree(adapters["lora-a"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(GlmtuneError, match=f"adapter odd .*{words}.*serve it alone"):
        MultiLora(torch.nn.Module()).add("odd", folder)


def test_a_sliding_window_model_is_answered_one_at_a_time_and_right(tmp_path, tokenizer, caplog):
    """A cache whose layers are not plain (Mistral's sliding window) cannot be joined across sequences: the
    batcher says so once and runs one sequence at a time, each answer still transformers' generate's."""
    from transformers import MistralConfig, MistralForCausalLM

    from glmtune.inference.generate import Generator
    from glmtune.models.loader import load_model

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=512, bos_token_id=1,
                           eos_token_id=2, pad_token_id=2, initializer_range=0.2, max_position_embeddings=1024)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = Generator(load_model(str(tmp_path)), "plain")
    prompts = [generator.prompt_ids([Message("user", q)]) for q in QUESTIONS[:3]]
    batcher = ContinuousBatcher(generator.loaded.model, stop_ids=generator.stop_ids)
    sequences = [Sequence(p, 6) for p in prompts]
    run(batcher, sequences, stagger=False)
    assert batcher.peak == 1 and not batcher.joinable
    assert "answering one at a time" in caplog.text
    for question, sequence in zip(QUESTIONS[:3], sequences):
        expected = generator.generate_ids([[Message("user", question)]], GenerationOptions(max_new_tokens=6))[0]
        assert sequence.tokens[len(sequence.prompt):] == expected
