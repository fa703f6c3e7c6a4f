"""Packing several samples into one sequence changes nothing the model learns: for every family and for
LoRA and P-Tuning v2, the summed loss and every trainable gradient of a packed batch, and of the
padding-free batch (all samples in one row), equal those of the same samples padded one per row."""

from __future__ import annotations

import pytest
import torch

from glmtune.data.packing import pack_features


def _features(lengths):
    return [{"input_ids": [i + 1] * n, "labels": [-100] * (n // 2) + [i + 1] * (n - n // 2)}
            for i, n in enumerate(lengths)]


def test_every_sample_lands_in_exactly_one_row_that_fits():
    lengths = [7, 3, 9, 1, 4, 4, 10, 2, 6, 5, 8, 3]
    features = _features(lengths)
    rows = pack_features(features, capacity=10)
    assert all(len(r["input_ids"]) == len(r["labels"]) == sum(r["lengths"]) <= 10 for r in rows)
    pieces = []
    for row in rows:
        starts = [sum(row["lengths"][:k]) for k in range(len(row["lengths"]))]
        row_pieces = [(row["input_ids"][a:a + n], row["labels"][a:a + n]) for a, n in zip(starts, row["lengths"])]
        owners = [ids[0] for ids, _ in row_pieces]
        assert owners == sorted(owners)  # the data's order inside a row
        pieces += row_pieces
    # each sample once, its labels travelling with it
    assert sorted(pieces) == sorted((f["input_ids"], f["labels"]) for f in features)
    assert len(rows) == 7  # 62 tokens: 7 rows of 10 is the fewest possible


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack_features(_features([5, 12]), capacity=10)


FAMILIES = ["generic", "glm4", "chatglm", "chatglm2"]
ROWS = [{"context": "请回答：" + "天气很好" * k, "target": "是的，" + "今天" * (5 - k)} for k in range(5)] + [
    {"context": "1+1=?", "target": "2"}]


@pytest.fixture
def varied_data(write_jsonl):
    return write_jsonl(ROWS, "varied.jsonl")


def _encoded(folder, data_file):
    from glmtune.data.formats import load_samples
    from glmtune.data.preprocess import Encoder, LengthLimits, encode_samples
    from glmtune.data.templates import get_template
    from glmtune.models.loader import load_model

    loaded = load_model(str(folder), dtype="float32")
    template = get_template("auto", loaded.tokenizer, loaded.family)
    samples = load_samples(data_file)[0]
    features, _ = encode_samples(samples, Encoder(loaded.tokenizer, template, loaded.stop_ids),
                                 LengthLimits(), progress=False)
    return loaded, features


def _loss_and_grads(model, batch):
    from glmtune.train.loss import labelled_loss_sum

    model.zero_grad()
    total, count = labelled_loss_sum(model, batch)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return total.detach(), int(count), grads


@pytest.mark.parametrize("method", ["lora", "ptuning"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_and_gradients_equal_unpacked(family, method, tiny_family_dir, varied_data):
    from glmtune.config import TrainConfig
    from glmtune.data.collate import PadCollator
    from glmtune.methods import get_method
    from glmtune.models.segment_attention import use_segment_attention
    from glmtune.train.loss import model_inputs
    from glmtune.train.recipe import pack_collator

    torch.manual_seed(0)
    loaded, features = _encoded(tiny_family_dir(family), varied_data)
    cfg = TrainConfig(model=str(loaded.path), method=method, pre_seq_len=4, lora_dropout=0.0, lora_rank=4)
    collate = pack_collator(loaded)
    if method == "lora" and family in ("generic", "glm4", "chatglm2"):  # as training sets it up: one sample at a time
        assert use_segment_attention(loaded.model)
    model = get_method(method).apply(loaded.model, cfg, loaded.family)
    model.eval()  # no dropout: the two layouts must see the same function
    with torch.no_grad():  # a trained-looking adapter, so its gradients are not trivially zero
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)

    capacity = max(max(len(f["input_ids"]) for f in features), sum(len(f["input_ids"]) for f in features) // 2)
    rows = pack_features(features, capacity)
    assert len(rows) < len(features)  # samples really share rows
    packed = model_inputs(collate(rows))
    padded = model_inputs(PadCollator(loaded.tokenizer.pad_token_id)(features))
    # the padding-free batch (the default): every sample side by side in one row
    one_row = model_inputs(pack_collator(loaded, one_row=True)(features))
    assert one_row["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))

    loss, count, grads = _loss_and_grads(model, padded)
    assert count > 0 and grads
    for batch in (packed, one_row):
        packed_loss, packed_count, packed_grads = _loss_and_grads(model, batch)
        assert packed_count == count
        assert torch.allclose(packed_loss, loss, rtol=1e-5, atol=1e-4), (packed_loss, loss)
        assert grads.keys() == packed_grads.keys()
        for name in grads:
            assert grads[name].abs().max() > 0
            # float32 sums in another order: equal to 1e-5 of the gradient's scale
            difference = (packed_grads[name] - grads[name]).abs().max()
            assert difference <= 1e-5 * grads[name].abs().max(), (name, float(difference))


def test_packed_samples_cannot_see_each_other(tiny_family_dir, varied_data):
    """The control for the test above: the same packed row with positions that do not restart (the
    samples then attend across their borders) gives a different loss."""
    from glmtune.train.loss import labelled_loss_sum, model_inputs
    from glmtune.train.recipe import pack_collator

    loaded, features = _encoded(tiny_family_dir("generic"), varied_data)
    rows = pack_features(features, sum(len(f["input_ids"]) for f in features))
    packed = model_inputs(pack_collator(loaded)(rows))
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    with torch.no_grad():
        assert not torch.allclose(labelled_loss_sum(loaded.model, packed)[0], labelled_loss_sum(loaded.model, leaky)[0])


def test_packing_is_refused_for_a_model_that_would_mix_samples(tiny_family_dir, varied_data):
    from glmtune.errors import GlmtuneError
    from glmtune.train.recipe import pack_collator

    loaded, _ = _encoded(tiny_family_dir("generic"), varied_data)
    loaded.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(GlmtuneError, match="cannot keep samples apart"):
        pack_collator(loaded)


def test_training_with_packing_counts_real_tokens_and_reuses_the_tokenized_data(tiny_model_dir, small_data, tmp_path,
                                                                                train_tiny, log_values, caplog):
    import logging

    caplog.set_level(logging.INFO)
    one_epoch = dict(max_steps=None, num_train_epochs=1, batch_size=2, cutoff_len=256, eval_on_start=False)
    packed = train_tiny(tiny_model_dir, small_data, tmp_path / "a", packing=True, **one_epoch)
    assert "packing: 12 training samples in" in caplog.text
    losses = log_values(packed.output_dir, "loss")
    assert losses and all(loss == loss for loss in losses)
    assert packed.metrics["batches_and_memory"]["batching"] == "packed"
    caplog.clear()
    padded = train_tiny(tiny_model_dir, small_data, tmp_path / "b", padding_free=False, **one_epoch)
    assert "tokenized train data loaded from cache" in caplog.text
    assert "tokenized dev data loaded from cache" in caplog.text
    # one epoch sees every real token once, packed or not; packed rows have no attention mask to count by
    assert log_values(packed.output_dir, "tokens_seen")[-1] == log_values(padded.output_dir, "tokens_seen")[-1] > 0
    assert packed.metrics["global_step"] < padded.metrics["global_step"]
