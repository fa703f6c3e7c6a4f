import torch

from glmtune.config import TrainConfig
from glmtune.data.collate import PadCollator
from glmtune.data.preprocess import IGNORE_INDEX
from glmtune.train.recipe import training_arguments

FEATURES = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]


def test_each_batch_is_padded_to_its_own_longest_sample():
    collate = PadCollator(pad_id=0)
    batch = collate(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert collate(FEATURES[1:])["input_ids"].shape == (1, 1)  # a short batch stays short
    assert all(t.dtype == torch.long for t in batch.values())


def test_left_padding_for_generation_and_rounding():
    batch = PadCollator(pad_id=0, side="left")([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in batch
    assert PadCollator(pad_id=0, multiple_of=8)(FEATURES)["input_ids"].shape == (2, 8)


def test_length_grouping_is_an_option(tmp_path):
    grouped = training_arguments(TrainConfig(group_by_length=True), tmp_path, has_dev=False)
    assert grouped.train_sampling_strategy == "group_by_length"
    plain = training_arguments(TrainConfig(), tmp_path, has_dev=False)  # random batches by default
    assert plain.train_sampling_strategy == "random"
