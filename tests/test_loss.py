"""The labelled-positions loss, computed a chunk of logits at a time, equals plain cross-entropy over full
logits: value and gradients, with a frozen output layer (gradient formed in the forward pass) and with a
trainable one (chunks recomputed in the backward pass)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmtune.train import loss as loss_module


@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_cross_entropy_equals_full_logits(trainable_head, monkeypatch):
    monkeypatch.setattr(loss_module, "LOGIT_CHUNK_ELEMENTS", 7 * 50)  # 7 rows per chunk: several chunks
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight.requires_grad_(trainable_head)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))

    expected = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected, [hidden] + ([head.weight] if trainable_head else []))
    ours = loss_module.chunked_cross_entropy(head, hidden, targets)
    grads = torch.autograd.grad(ours * 1.0, [hidden] + ([head.weight] if trainable_head else []))
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)

    # scaled from outside (a loss divided by the token count): the chain rule still holds
    scaled = torch.autograd.grad(loss_module.chunked_cross_entropy(head, hidden, targets) / 23, hidden)[0]
    assert torch.allclose(scaled, expected_grads[0] / 23, rtol=1e-5, atol=1e-7)


def test_no_full_logits_tensor_is_built(monkeypatch):
    """The largest float32 tensor made while the loss runs is one chunk of logits, not [tokens, vocab]."""
    monkeypatch.setattr(loss_module, "LOGIT_CHUNK_ELEMENTS", 10 * 1000)
    head = torch.nn.Linear(8, 1000, bias=False).requires_grad_(False)
    hidden = torch.randn(200, 8, requires_grad=True)
    targets = torch.randint(0, 1000, (200,))
    largest = 0

    def watch(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    watch(t)
            return out

    with Watch():
        loss_module.chunked_cross_entropy(head, hidden, targets).backward()
    assert largest <= 10 * 1000 < 200 * 1000


def test_labelled_loss_equals_the_models_own_loss_and_gradients(tiny_model_dir):
    from glmtune.config import TrainConfig
    from glmtune.methods import get_method
    from glmtune.models.loader import load_model

    torch.manual_seed(0)
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    model = get_method("lora").apply(loaded.model, TrainConfig(model=str(tiny_model_dir), lora_dropout=0.0),
                                     loaded.family)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(10, 1000, (3, 17))
    labels = ids.clone()
    labels[:, :9] = -100
    labels[2, 14:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trained = [p for p in model.parameters() if p.requires_grad]

    reference = model(**batch).loss
    reference_grads = torch.autograd.grad(reference, trained)
    ours = loss_module.labelled_positions_loss(model, batch)
    grads = torch.autograd.grad(ours, trained)
    assert torch.allclose(ours, reference, rtol=1e-5)
    for got, want in zip(grads, reference_grads):  # float32 sums in another order
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
