"""The training memory estimate (glmtune.train.memory) against the measured peak of real CPU training steps.

Every case trains tiny models for two steps on the CPU (fp32, the optimizer's state exists in the second)
and measures the peak bytes allocated in the second (glmtune.bench.measure.ProfiledMemory, from the
profiler's memory events, with the model's weights and the optimizer state as the baseline); the
estimate for device="cpu" must be within TOLERANCE of it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from glmtune.bench.measure import ProfiledMemory, storage_bytes
from glmtune.config import TrainConfig
from glmtune.methods import get_method
from glmtune.models.kbit import Quantization
from glmtune.train.loss import labelled_positions_loss
from glmtune.train.memory import GIB, estimate_training_memory
from transformers.modeling_layers import GradientCheckpointingLayer

TOLERANCE = 0.15  # |estimate - measured| / measured, the target


@dataclass
class Step:
    measured: int  # peak bytes of the second training step
    estimate: object  # MemoryEstimate


def train_step_peak(model_dir: Path, method: str, *, batch: int, length: int, answer: int,
                    checkpointing: bool = False, all_logits: bool = False, quantization: int = 0,
                    every_n_layers: int = 1) -> Step:
    """Load the model as training does, apply the method, run two AdamW steps on a right-padded batch and
    return the second step's peak with the estimate for the same shapes. `every_n_layers`: with
    checkpointing, only every n-th decoder layer recomputes (as gradient_checkpointing auto asks)."""
    from glmtune.models.loader import load_model

    torch.manual_seed(0)
    loaded = load_model(str(model_dir), quantization=quantization)
    options = TrainConfig(model=str(model_dir), method=method, pre_seq_len=16, lora_dropout=0.0)
    model = get_method(method).apply(loaded.model, options, loaded.family)
    model.config.use_cache = False
    model.train()
    recomputed = 0
    if checkpointing:  # as the Trainer turns it on
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            every_n_layers=every_n_layers)
        recomputed = sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
                         and m.gradient_checkpointing)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :length - answer] = -100
    cut = length // 4  # the first row is shorter: padding, as the collator makes it
    ids[0, -cut:] = loaded.tokenizer.pad_token_id or 0
    mask[0, -cut:] = 0
    labels[0, -cut:] = -100
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=True)
    def step():
        loss = model(**inputs).loss if all_logits else labelled_positions_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the optimizer's state
    with ProfiledMemory(baseline=storage_bytes(model, optimizer)) as memory:
        step()
    labelled = int((labels[:, 1:] != -100).sum())
    estimate = estimate_training_memory(
        model, batch_size=batch, seq_len=length, labelled=labelled, dtype=torch.float32,
        quantization=loaded.quantization, gradient_checkpointing=recomputed, all_logits=all_logits)
    return Step(memory.peak, estimate)


def assert_close(step: Step) -> None:
    mib = {k: round(v / 2**20, 2) for k, v in step.estimate.parts.items()}
    error = step.estimate.total / step.measured - 1
    print(f"measured {step.measured / 2**20:.2f} MiB, estimate {step.estimate.total / 2**20:.2f} MiB "
          f"({error:+.1%}) {mib}")
    assert abs(error) <= TOLERANCE, (step.measured, step.estimate.parts)


CASES = {  # id: (family, method, options)
    "lora": ("generic", "lora", dict(batch=8, length=256, answer=8)),
    "lora-checkpointing": ("generic", "lora", dict(batch=8, length=256, answer=8, checkpointing=True)),
    "lora-labelled-logits": ("generic", "lora", dict(batch=4, length=128, answer=48)),
    "lora-all-logits": ("generic", "lora", dict(batch=4, length=128, answer=48, all_logits=True)),
    "ptuning": ("generic", "ptuning", dict(batch=8, length=256, answer=8)),
    "ptuning-checkpointing": ("generic", "ptuning", dict(batch=8, length=256, answer=8, checkpointing=True)),
    "chatglm3-ptuning": ("chatglm3", "ptuning", dict(batch=8, length=256, answer=8)),
    "chatglm3-ptuning-checkpointing": ("chatglm3", "ptuning", dict(batch=8, length=256, answer=8,
                                                                     checkpointing=True)),
    "chatglm3-lora-int4": ("chatglm3", "lora", dict(batch=8, length=256, answer=8, quantization=4)),
    "glm4-lora": ("glm4", "lora", dict(batch=8, length=256, answer=8)),
}


@pytest.fixture(scope="module")
def steps(tiny_family_dir):
    """Each case measured once (several tests compare them)."""
    done: dict[str, Step] = {}

    def get(case: str) -> Step:
        if case not in done:
            family, method, options = CASES[case]
            done[case] = train_step_peak(tiny_family_dir(family), method, **options)
        return done[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_matches_the_measured_peak(case, steps):
    assert_close(steps(case))


def test_the_parts_react_as_they_should(steps, tiny_model_dir):
    plain, checkpointed = steps("lora"), steps("lora-checkpointing")
    # gradient checkpointing keeps one layer's activations instead of all: less, measured and estimated
    assert checkpointed.estimate.parts["activations"] < 0.7 * plain.estimate.parts["activations"]
    assert checkpointed.measured < plain.measured
    assert checkpointed.estimate.parts["weights"] == plain.estimate.parts["weights"]
    # logits at every position instead of labelled ones only, at the same shapes
    labelled, everywhere = steps("lora-labelled-logits"), steps("lora-all-logits")
    assert everywhere.estimate.parts["logits"] > 4 * labelled.estimate.parts["logits"]
    assert everywhere.measured > 3 * labelled.measured
    # twice the batch: twice the activations, the same weights
    double = train_step_peak(tiny_model_dir, "lora", batch=16, length=256, answer=8)
    assert_close(double)
    ratio = double.estimate.parts["activations"] / plain.estimate.parts["activations"]
    assert 1.9 < ratio < 2.1
    measured = (double.measured - double.estimate.parts["weights"]) / (plain.measured - plain.estimate.parts["weights"])
    assert 1.5 < measured < 2.5
    assert double.estimate.parts["weights"] == plain.estimate.parts["weights"]


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_weights_are_counted_from_the_dtype_and_the_quantization(tiny_family_dir, method):
    """A meta model in fp32 asked to estimate bf16 and int4 gives the bytes the real models hold (under LoRA
    too, whose wrappers rename each adapted layer <name>.base_layer)."""
    from glmtune.models.loader import load_model

    folder = tiny_family_dir("chatglm3")
    options = TrainConfig(model=str(folder), method=method, pre_seq_len=16)
    for bits in (0, 4, 8):
        real = load_model(str(folder), quantization=bits)
        real_model = get_method(method).apply(real.model, options, real.family)
        trained = sum(p.numel() * p.element_size() for p in real_model.parameters() if p.requires_grad)
        with torch.device("meta"):
            meta = type(real.model)(real.model.config.__class__.from_pretrained(folder))
        meta = get_method(method).apply(meta, options, real.family)
        asked = Quantization(bits=bits, backend="chatglm") if bits else Quantization()
        for model in (real_model, meta):
            estimate = estimate_training_memory(model, batch_size=1, seq_len=8, labelled=1, dtype=torch.float32,
                                                quantization=asked, gradient_checkpointing=False)
            assert estimate.parts["weights"] == storage_bytes(real_model) - trained, (bits, model is meta)
    half = estimate_training_memory(meta, batch_size=1, seq_len=8, labelled=1, dtype=torch.bfloat16,
                                    quantization=Quantization(), gradient_checkpointing=False)
    full = estimate_training_memory(meta, batch_size=1, seq_len=8, labelled=1, dtype=torch.float32,
                                    quantization=Quantization(), gradient_checkpointing=False)
    assert half.parts["weights"] * 2 == full.parts["weights"]
    assert half.parts["trainable"] == full.parts["trainable"]  # the prefix trains in fp32 either way


def test_profiled_memory_follows_allocations_and_releases():
    with ProfiledMemory(baseline=100) as memory:
        a = torch.zeros(1024, 256)  # 1 MiB
        view = a[:10]
        del a  # the view keeps it
        b = torch.ones(512, 256)  # 0.5 MiB more
        del view, b
        c = torch.ones(256, 256)  # kept: 0.25 MiB
    assert memory.current == 100 + 2**18
    assert memory.peak == 100 + 2**20 + 2**19
    with ProfiledMemory() as inside:
        torch.logsumexp(c, dim=-1)  # a temporary as large as c, made and freed inside the operator
    assert inside.peak >= 2**18 and inside.current == 0


def test_dry_run_prints_the_estimate(tmp_path, capsys):
    """ChatGLM3-6B's official config, LoRA as examples/chatglm3_lora.yaml: 6,243,584,000 frozen parameters
    are 2 bytes each in bf16."""
    from glmtune.cli import main
    from glmtune.paths import shared_dir

    source = shared_dir() / "fixtures" / "tokenizers" / "chatglm2-6b"
    if not (source / "tokenizer.model").is_file():
        pytest.skip(f"chatglm2-6b tokenizer fixture not found under {source} (set GLMTUNE_SHARED)")
    folder = tmp_path / "chatglm3-6b"
    folder.mkdir()
    shutil.copy(source / "official_config.chatglm3.json", folder / "config.json")
    shutil.copy(source / "tokenizer.model", folder)
    shutil.copy(source / "tokenizer_config.chatglm3.json", folder / "tokenizer_config.json")
    rows = [{"prompt": "类型#裙*颜色#蓝色" * 10, "response": "这是一条回答。" * (5 + i)}
            for i in range(6)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    root = Path(__file__).resolve().parent.parent
    code = main(["train", str(root / "examples" / "chatglm3_lora.yaml"), f"model={folder}", f"train_file={train}",
                 "dev_file=none", f"output_dir={tmp_path / 'out'}", "--dry-run"])
    output = capsys.readouterr().out
    assert code == 0, output
    line = next(x for x in output.splitlines() if x.startswith("peak GPU memory (estimate): "))
    assert " at batch 1 x " in line and line.endswith("bf16")  # padding-free: the 4 longest samples in one row
    assert f"weights {6_243_584_000 * 2 / GIB:.1f}," in line  # 11.6 GiB

    from glmtune.config import read_config_file
    from glmtune.train.dry_run import dry_run

    cfg = TrainConfig(**{**read_config_file(root / "examples" / "chatglm3_lora.yaml"), "model": str(folder),
                         "train_file": str(train), "dev_file": None, "output_dir": str(tmp_path / "out")})
    result = dry_run(cfg)
    parts = result.memory.parts
    assert result.total - result.trainable == 6_243_584_000
    assert parts["weights"] == 2 * (result.total - result.trainable)  # exactly: bf16, no buffers
    assert parts["trainable"] == 16 * result.trainable  # fp32 parameter, gradient and two AdamW moments
    assert 12 * GIB < result.memory.total < 40 * GIB
    # padding-free: the 4 longest samples side by side in one row, each longer than 100 tokens
    assert result.memory.batch_size == 1 and result.memory.seq_len > 400
    padded = dry_run(replace(cfg, padding_free=False)).memory
    assert padded.batch_size == 4 and 4 * padded.seq_len >= result.memory.seq_len


def test_auto_checkpointing_recomputes_the_fewest_layers_that_keep_the_step_under_its_budget(steps, tiny_model_dir):
    """gradient_checkpointing auto on the 2-layer model: a budget between 'recompute one layer' and 'keep
    both' recomputes exactly one layer, and that step's measured peak fits the budget while keeping both
    would not."""
    from glmtune.models.loader import load_model
    from glmtune.train.recompute import checkpointing_arguments, plan_recompute

    plain, every = steps("lora"), steps("lora-checkpointing")
    one = train_step_peak(tiny_model_dir, "lora", batch=8, length=256, answer=8, checkpointing=True, every_n_layers=2)
    assert_close(one)
    assert every.measured < one.measured < plain.measured  # each recomputed layer gives memory back
    budget = (one.estimate.total + plain.estimate.total) / 2
    assert one.measured <= budget < plain.measured

    loaded = load_model(str(tiny_model_dir))
    model = get_method("lora").apply(loaded.model, TrainConfig(model=str(tiny_model_dir), lora_dropout=0.0),
                                     loaded.family)
    features = [{"input_ids": [7] * 256, "labels": [-100] * 248 + [7] * 8}] * 8

    def plan(budget_gib: float | None):
        return plan_recompute(model, requested=None, budget_gib=budget_gib, device="cpu", features=features,
                              batch_size=8, one_row=False, dtype=torch.float32, weights_dtype=torch.float32)

    chosen = plan(budget / GIB)
    assert (chosen.recomputed, chosen.layers, chosen.every_n_layers) == (1, 2, 2), chosen
    assert checkpointing_arguments(chosen) == {"activation_checkpointing": True, "activation_checkpointing_kwargs":
                                               {"use_reentrant": False, "every_n_layers": 2}}
    assert plan(plain.estimate.total * 1.5 / GIB).recomputed == 0  # room for everything: nothing recomputed
    assert plan(1e-3).recomputed == 2 and "still over the budget" in plan(1e-3).why  # every layer, and said
    assert plan(None).budget_bytes == min(6 * GIB, plan(None).budget_bytes)  # the CPU default: at most 6 GiB
