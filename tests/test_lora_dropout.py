"""LoRA's input dropout: one mask per input, the same keep rate and scale as nn.Dropout, replayed exactly
by gradient checkpointing."""

from __future__ import annotations

import torch

from glmtune.methods.lora_dropout import SharedInputDropout


def _lora_model(tiny_model_dir, dropout: float):
    from glmtune.config import TrainConfig
    from glmtune.methods import get_method
    from glmtune.models.loader import load_model

    loaded = load_model(str(tiny_model_dir), dtype="float32")
    options = TrainConfig(model=str(tiny_model_dir), lora_dropout=dropout, lora_target="q_proj,v_proj,gate_proj,up_proj")
    model = get_method("lora").apply(loaded.model, options, loaded.family)
    model.config.use_cache = False
    return model


def test_dropout_keeps_each_element_with_probability_1_minus_p_and_rescales():
    dropout = SharedInputDropout(0.25, {})
    x = torch.full((1000, 1000), 2.0)
    out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    assert torch.all(out[kept] == 2.0 / 0.75)
    assert dropout(x) is out  # the same input again: the same draw
    assert not torch.equal(dropout(x.clone()), out)  # another input: a new draw
    dropout.eval()
    assert dropout(x) is x


def test_projections_that_read_one_input_share_one_mask(tiny_model_dir):
    model = _lora_model(tiny_model_dir, 0.3)
    dropouts = {name: m for name, m in model.named_modules() if isinstance(m, SharedInputDropout)}
    assert len(dropouts) == 8  # q, v, gate and up in each of the 2 layers: every nn.Dropout replaced
    outputs = {}
    for name, module in dropouts.items():
        module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
    model.train()
    model(input_ids=torch.randint(5, 500, (2, 12)))
    for layer in (0, 1):
        mine = {k.split(".")[-3]: v for k, v in outputs.items() if f"layers.{layer}." in k}
        assert mine["q_proj"] is mine["v_proj"] and mine["gate_proj"] is mine["up_proj"]  # one draw per input
        assert not torch.equal(mine["q_proj"], mine["gate_proj"])  # different inputs, different draws
        assert bool((mine["q_proj"] == 0).any())  # dropout did drop


def test_recomputed_layers_replay_the_same_masks(tiny_model_dir):
    model = _lora_model(tiny_model_dir, 0.3)
    model.train()
    ids = torch.randint(5, 500, (2, 16))

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    recomputed_loss, recomputed = loss_and_grads()
    assert plain and plain.keys() == recomputed.keys()
    assert abs(plain_loss - recomputed_loss) < 1e-6
    for name, grad in plain.items():
        assert torch.allclose(grad, recomputed[name], atol=1e-6), name
