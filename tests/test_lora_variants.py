"""The LoRA variants (rsLoRA, DoRA, LoRA+, PiSSA/OLoRA initialisation) and NEFTune reach peft and the
Trainer as documented, and the defaults that depend on the model's size."""

from __future__ import annotations

import math

import pytest
import torch

from glmtune.cli import main
from glmtune.config import TrainConfig, resolve
from glmtune.errors import GlmtuneError
from glmtune.methods import get_method
from glmtune.train.size_defaults import base_parameter_count, default_learning_rate

TARGETS = "q_proj,v_proj,gate_proj"


def _adapted(tiny_model_dir, **options):
    from glmtune.models.loader import load_model

    loaded = load_model(str(tiny_model_dir), dtype="float32")
    original = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    cfg = resolve(TrainConfig(model=str(tiny_model_dir), lora_target=TARGETS, **options))
    return get_method("lora").apply(loaded.model, cfg, loaded.family), original, cfg


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_model_dir):
    plain, _, _ = _adapted(tiny_model_dir, lora_rank=16, use_rslora=False)
    rs, _, _ = _adapted(tiny_model_dir, lora_rank=16, use_rslora=True)
    assert plain.peft_config["default"].lora_alpha == 32.0  # the default alpha: twice the rank
    assert {m.scaling["default"] for m in _lora_layers(plain).values()} == {2.0}
    assert {m.scaling["default"] for m in _lora_layers(rs).values()} == {32.0 / math.sqrt(16)}


def test_rslora_is_on_by_default_only_while_alpha_is_the_default(tiny_model_dir):
    default, _, cfg = _adapted(tiny_model_dir, lora_rank=16)
    assert cfg.use_rslora is True and default.peft_config["default"].use_rslora
    assert {m.scaling["default"] for m in _lora_layers(default).values()} == {8.0}  # 32 / sqrt(16)
    chosen, _, cfg = _adapted(tiny_model_dir, lora_rank=8, lora_alpha=32.0)  # a tutorial's alpha keeps its meaning
    assert cfg.use_rslora is False and {m.scaling["default"] for m in _lora_layers(chosen).values()} == {4.0}
    assert resolve(TrainConfig(method="ptuning")).use_rslora is False  # not refused as a LoRA variant
    assert resolve(resolve(TrainConfig())) == resolve(TrainConfig())


def test_dora_trains_a_magnitude_per_output(tiny_model_dir):
    model, _, _ = _adapted(tiny_model_dir, use_dora=True)
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(magnitudes) == 6  # q, v and gate in each of the 2 layers
    assert model.peft_config["default"].use_dora


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_from_the_weights_and_keep_the_model_unchanged(tiny_model_dir, init):
    model, original, _ = _adapted(tiny_model_dir, lora_init=init)
    layers = _lora_layers(model)
    assert len(layers) == 6
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert b.abs().sum() > 0  # unlike the default start, B is not zero
        base_name = name.removeprefix("base_model.model.") + ".weight"
        residual = layer.get_base_layer().weight
        assert not torch.allclose(residual, original[base_name])  # part of the weight moved into A and B
        # what the layer computes at the start is still the original weight
        effective = residual + layer.scaling["default"] * (b @ a)
        assert torch.allclose(effective, original[base_name], atol=1e-4)


def test_pissa_adapter_is_saved_for_the_original_base(tmp_path, tiny_model_dir, small_data, train_tiny):
    """The trained PiSSA model in memory (residual base + adapter) and the saved adapter loaded over the
    original base give the same logits, merged or not."""
    from glmtune.methods.adapter import load_tuned_model

    result = train_tiny(tiny_model_dir, (small_data[0], None), tmp_path / "out", lora_init="pissa", max_steps=2,
                        lora_target=TARGETS, learning_rate=1e-2)
    ids = torch.tensor([[1, 400, 500, 600, 700, 800]])
    model = result.model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    loaded, info = load_tuned_model(None, result.adapter_dir, dtype="float32")
    with torch.no_grad():
        reloaded = loaded.model(input_ids=ids).logits
    assert info["parameters"]["lora_init"] == "pissa"
    assert torch.allclose(trained, reloaded, atol=1e-4)
    config = (result.adapter_dir / "adapter_config.json").read_text()
    assert '"r": 32' in config  # peft's conversion: a LoRA of twice the rank over the original weights


def test_loraplus_gives_b_its_own_learning_rate(tmp_path, tiny_model_dir, small_data, train_tiny):
    result = train_tiny(tiny_model_dir, (small_data[0], None), tmp_path / "out", loraplus_lr_ratio=16.0,
                        max_steps=1, learning_rate=1e-3, lora_target=TARGETS, warmup_ratio=0.0,
                        lr_scheduler="constant")
    # Adam's first step moves each weight by about the learning rate: B (which started at zero) by 16 x 1e-3
    moved = max(p.detach().abs().max().item() for n, p in result.model.named_parameters() if "lora_B" in n)
    assert moved == pytest.approx(16e-3, rel=0.05)


def test_loraplus_optimizer_groups(tmp_path, tiny_model_dir, small_data):
    from glmtune.train.recipe import build_trainer, prepare

    cfg = TrainConfig(model=str(tiny_model_dir), train_file=str(small_data[0]), loraplus_lr_ratio=4.0,
                      learning_rate=1e-3, lora_target=TARGETS, max_steps=1, output_dir=str(tmp_path / "out"))
    prepared = prepare(cfg, progress=False)
    trainer = build_trainer(prepared, [])
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in prepared.model.named_parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates.setdefault("lora_A" if "lora_A" in names[id(p)] else "lora_B", set()).add(group["lr"])
    assert rates == {"lora_A": {1e-3}, "lora_B": {4e-3}}


def test_neftune_noise_per_sample_length_and_only_while_training(tiny_model_dir):
    from glmtune.data.collate import SAMPLE_LENGTHS, PackCollator, PadCollator
    from glmtune.models.loader import load_model
    from glmtune.train.neftune import EmbeddingNoise

    model = load_model(str(tiny_model_dir), dtype="float32").model
    embeddings = model.get_input_embeddings()
    rows = [{"input_ids": list(range(10, 13)), "labels": [-100, 11, 12]},
            {"input_ids": list(range(20, 28)), "labels": [-100] * 4 + list(range(24, 28))}]
    one_row = PackCollator(0, count_tokens=True, one_row=True)(rows)
    assert one_row[SAMPLE_LENGTHS].tolist() == [[3] * 3 + [8] * 8]
    padded = PadCollator(0, count_tokens=True)(rows)
    assert padded[SAMPLE_LENGTHS].tolist() == [[3, 3, 3, 0, 0, 0, 0, 0], [8] * 8]

    noise = EmbeddingNoise(model, alpha=5.0)
    clean = embeddings(one_row["input_ids"]).detach()
    noise.take_lengths(one_row)
    model.train()
    noisy = embeddings(one_row["input_ids"]).detach()
    added = (noisy - clean).abs().amax(-1)[0]
    bound = torch.tensor([5.0 / math.sqrt(3 * 64)] * 3 + [5.0 / math.sqrt(8 * 64)] * 8)
    assert torch.all(added <= bound + 1e-6) and torch.all(added > bound / 2)  # uniform in [-b, b]: max near b
    model.eval()
    assert torch.equal(embeddings(one_row["input_ids"]), clean)
    noise.take_lengths(padded)
    model.train()
    padded_noise = (embeddings(padded["input_ids"]) - embeddings.weight[padded["input_ids"]]).abs().amax(-1)
    assert torch.all(padded_noise[0, 3:] == 0)  # padding gets none
    assert noise.calls == 2
    noise.remove()


def test_neftune_runs_in_training_and_not_through_the_trainers_own(tmp_path, tiny_model_dir, small_data):
    from glmtune.train.recipe import build_trainer, prepare

    cfg = TrainConfig(model=str(tiny_model_dir), train_file=str(small_data[0]), neftune_noise_alpha=5.0,
                      max_steps=2, batch_size=4, output_dir=str(tmp_path / "out"), save_strategy="no")
    prepared = prepare(cfg, progress=False)
    trainer = build_trainer(prepared, [])
    trainer.train()
    assert trainer.embedding_noise.calls >= 2
    assert prepared.args.neftune_noise_alpha is None  # transformers' NEFTune would scale by the whole row


def test_default_learning_rate_follows_the_model_size():
    assert default_learning_rate("lora", 134_515_008) == 2e-3
    assert default_learning_rate("lora", 10_000) == 2e-3
    assert default_learning_rate("qlora", 7_000_000_000) == 2e-4
    assert default_learning_rate("lora", 6_243_584_000) == pytest.approx(2.1e-4)  # ChatGLM-6B
    assert 1.5e-4 < default_learning_rate("lora", 9_400_000_000) < 2e-4  # GLM-4-9B
    assert default_learning_rate("lora", 70_000_000_000) == 1e-4
    assert default_learning_rate("ptuning", 135_000_000) == default_learning_rate("ptuning", 10_000) == 5e-2
    assert default_learning_rate("ptuning", 6_200_000_000) == default_learning_rate("ptuning", 70e9) == 2e-2
    assert 2e-2 < default_learning_rate("ptuning", 1_000_000_000) < 5e-2


def test_quantized_layers_count_their_unpacked_weights(tiny_model_dir):
    from glmtune.models.loader import load_model
    from glmtune.models.quantization import quantize_modules

    model = load_model(str(tiny_model_dir), dtype="float32").model
    full = base_parameter_count(model)
    assert full == sum(p.numel() for p in model.parameters())
    quantize_modules(model, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert abs(base_parameter_count(model) - full) / full < 0.01  # only the per-row scales are added


def test_resolved_config_shows_every_default_used(tmp_path, tiny_model_dir, small_data):
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(small_data[0]), "--output-dir",
                 str(out), "--max-steps", "1", "--save-strategy", "no"]) == 0
    import yaml

    used = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert used["learning_rate"] == 2e-3 and used["lora_alpha"] == 32.0 and used["warmup_ratio"] == 0.05
    assert used["lora_rank"] == 16 and used["lora_dropout"] == 0.0 and used["use_rslora"] is True
    assert used["lora_target"] == "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"
    out2 = tmp_path / "given"
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(small_data[0]), "--output-dir",
                 str(out2), "--max-steps", "1", "--save-strategy", "no", "--learning-rate", "5e-4",
                 "--warmup-steps", "1", "--lora-alpha", "8"]) == 0
    used = yaml.safe_load((out2 / "resolved_config.yaml").read_text())
    assert (used["learning_rate"], used["warmup_ratio"], used["warmup_steps"], used["lora_alpha"]) == (5e-4, 0.0, 1, 8)
    assert used["use_rslora"] is False


@pytest.mark.parametrize("options, message", [
    (dict(method="ptuning", use_dora=True), "use_dora belong(s) to LoRA"),
    (dict(method="ptuning", loraplus_lr_ratio=16.0), "loraplus_lr_ratio belong(s) to LoRA"),
    (dict(method="qlora", lora_init="pissa"), "lora_init pissa starts LoRA from the base's own weights"),
    (dict(quantization_bit=8, lora_init="olora"), "lora_init olora starts LoRA"),
])
def test_variants_that_cannot_apply_are_refused(options, message):
    with pytest.raises(GlmtuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(TrainConfig(train_file="x.jsonl", **options))


def test_cli_refuses_a_variant_for_ptuning_with_exit_2(capsys, small_data):
    assert main(["train", "--train-file", str(small_data[0]), "--method", "ptuning", "--use-rslora"]) == 2
    assert "use_rslora belong(s) to LoRA" in capsys.readouterr().err


def test_resume_needs_the_same_variant(tmp_path):
    """Neither rsLoRA's scale nor PiSSA's changed base shows in the weights' shapes: the recorded settings do."""
    from glmtune.config import to_yaml
    from glmtune.train.run_folder import check_resumed_setup

    recorded = resolve(TrainConfig(train_file="x.jsonl", lora_init="pissa",
                                   lora_target="model.layers.0.self_attn.q_proj,model.layers.1.self_attn.q_proj"))
    (tmp_path / "resolved_config.yaml").write_text(to_yaml(recorded))
    check_resumed_setup(tmp_path, resolve(TrainConfig(train_file="x.jsonl", lora_init="pissa", lora_target="q_proj")))
    with pytest.raises(GlmtuneError, match="trained with lora_init 'pissa'"):
        check_resumed_setup(tmp_path, resolve(TrainConfig(train_file="x.jsonl", lora_target="q_proj")))


@pytest.mark.parametrize("family, method", [("chatglm", "ptuning"), ("chatglm2", "lora"), ("glm4", "lora")])
def test_neftune_reaches_every_family_and_method(tmp_path, tiny_family_dir, small_data, family, method):
    from glmtune.train.recipe import build_trainer, prepare

    cfg = TrainConfig(model=str(tiny_family_dir(family)), train_file=str(small_data[0]), method=method,
                      pre_seq_len=4, neftune_noise_alpha=5.0, max_steps=1, batch_size=2,
                      output_dir=str(tmp_path / "out"), save_strategy="no", max_train_samples=4)
    prepared = prepare(cfg, progress=False)
    trainer = build_trainer(prepared, [])
    trainer.train()
    assert trainer.embedding_noise.calls >= 1
