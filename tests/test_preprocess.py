import pytest

from glmtune.data.formats import Message, Sample, load_samples
from glmtune.data.preprocess import IGNORE_INDEX, Encoder, LengthLimits, encode_samples
from glmtune.data.stats import describe, length_stats, percentile
from glmtune.data.templates import ChatTemplate, PlainTemplate, get_template
from glmtune.paths import shared_dir

NO_LIMITS = LengthLimits()


def sample(*pairs, system=None, history_trainable=True):
    messages = [Message("system", system)] if system else []
    for i, (q, a) in enumerate(pairs):
        last = i == len(pairs) - 1
        messages += [Message("user", q), Message("assistant", a, trainable=last or history_trainable)]
    return Sample(messages, row={}, where="test:1")


def labelled(feature):
    return [t for t, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE_INDEX]


def test_plain_template_masks_the_prompt_and_trains_answer_plus_eos(tokenizer):
    encoder = Encoder(tokenizer, PlainTemplate())
    feature, cut = encoder.encode(sample(("请回答：", "好的")), NO_LIMITS)
    prompt = tokenizer.encode("请回答：", add_special_tokens=False)
    answer = tokenizer.encode("好的", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert feature["input_ids"] == prompt + answer
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert not cut.any


def test_chat_template_labels_exactly_the_answer_and_its_end_token(tokenizer):
    encoder = Encoder(tokenizer, ChatTemplate(tokenizer))
    s = sample(("北京是哪国的首都？", "中国"))
    feature, _ = encoder.encode(s, NO_LIMITS)
    assert tokenizer.decode(labelled(feature)) == "中国<|im_end|>\n"
    first_label = next(i for i, label in enumerate(feature["labels"]) if label != IGNORE_INDEX)
    # the prompt a model is given at inference is exactly the unlabelled prefix it was trained on
    prompt_ids, was_cut = encoder.prompt_ids(s.prompt_messages)
    assert feature["input_ids"][:first_label] == prompt_ids and not was_cut
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_every_assistant_turn_is_trained_but_history_is_context(tokenizer):
    encoder = Encoder(tokenizer, ChatTemplate(tokenizer))
    both, _ = encoder.encode(sample(("一", "A"), ("二", "B")), NO_LIMITS)
    assert tokenizer.decode(labelled(both)) == "A<|im_end|>\nB<|im_end|>\n"
    history, _ = encoder.encode(sample(("一", "A"), ("二", "B"), history_trainable=False), NO_LIMITS)
    assert tokenizer.decode(labelled(history)) == "B<|im_end|>\n"
    assert history["input_ids"] == both["input_ids"]


def test_source_limit_cuts_the_message_and_keeps_the_scaffolding(tokenizer):
    encoder = Encoder(tokenizer, ChatTemplate(tokenizer))
    long_question = "这是一个很长的问题。" * 30
    s = sample((long_question, "短答案"))
    full, _ = encoder.encode(s, NO_LIMITS)
    feature, cut = encoder.encode(s, LengthLimits(max_source_length=60))
    prompt_len = sum(1 for label in feature["labels"] if label == IGNORE_INDEX)
    assert prompt_len == 60
    assert cut.prompt and not cut.answer and cut.tokens == len(full["input_ids"]) - len(feature["input_ids"])
    text = tokenizer.decode(feature["input_ids"])
    assert text.startswith("<|im_start|>system") and "<|im_end|>\n<|im_start|>assistant\n" in text
    assert tokenizer.decode(labelled(feature)) == "短答案<|im_end|>\n"


def test_target_limit_keeps_the_end_token(tokenizer):
    encoder = Encoder(tokenizer, PlainTemplate())
    feature, cut = encoder.encode(sample(("问", "答" * 50)), LengthLimits(max_target_length=10))
    answer = labelled(feature)
    assert len(answer) == 10 and answer[-1] == tokenizer.eos_token_id
    assert cut.answer and not cut.prompt


def test_cutoff_len_is_shared_between_prompt_and_answer(tokenizer):
    encoder = Encoder(tokenizer, PlainTemplate())
    short_answer = sample(("问" * 100, "好"))
    feature, cut = encoder.encode(short_answer, LengthLimits(cutoff_len=40))
    answer_len = encoder.lengths(short_answer)[0][1]
    assert len(feature["input_ids"]) == 40 and len(labelled(feature)) == answer_len  # the short side keeps all
    assert cut.prompt and not cut.answer
    both_long = sample(("问" * 100, "答" * 100))
    src, tgt = encoder.lengths(both_long)[0]
    feature, cut = encoder.encode(both_long, LengthLimits(cutoff_len=40))
    assert len(feature["input_ids"]) == 40 and cut.prompt and cut.answer
    assert abs(len(labelled(feature)) - round(40 * tgt / (src + tgt))) <= 1  # split in proportion


def test_later_turns_that_do_not_fit_are_dropped_and_counted(tokenizer):
    encoder = Encoder(tokenizer, PlainTemplate())
    s = sample(("一" * 20, "A" * 5), ("二" * 20, "B" * 5), ("三" * 20, "C" * 5))
    lengths = encoder.lengths(s)
    budget = sum(lengths[0])  # room for the first turn only
    feature, cut = encoder.encode(s, LengthLimits(cutoff_len=budget))
    assert len(feature["input_ids"]) == budget
    assert cut.turns_dropped == 2 and cut.tokens == sum(a + b for a, b in lengths[1:])


def test_truncation_report_counts_match_the_lengths(tokenizer, sample_files):
    train, _ = sample_files
    samples, _ = load_samples(train)
    encoder = Encoder(tokenizer, get_template("auto", tokenizer))
    limits = LengthLimits(max_source_length=110, max_target_length=64)
    _, report = encode_samples(samples, encoder, limits, progress=False)
    lengths = [encoder.lengths(s)[0] for s in samples]
    assert report.samples == len(samples)
    assert report.prompts_cut == sum(src > 110 for src, _ in lengths) > 0
    assert report.answers_cut == sum(tgt > 64 for _, tgt in lengths) > 0
    assert report.samples_cut == sum(src > 110 or tgt > 64 for src, tgt in lengths)
    assert f"{report.samples_cut} of {len(samples)} samples cut" in report.summary("train", limits)


def test_stats_and_their_suggestions(tokenizer, sample_files):
    train, _ = sample_files
    samples, _ = load_samples(train)
    encoder = Encoder(tokenizer, get_template("auto", tokenizer))
    stats = length_stats(samples, encoder, LengthLimits(max_source_length=100, max_target_length=100))
    assert stats.samples == 400
    assert stats.prompt["max"] >= stats.prompt["p99"] >= stats.prompt["p95"] >= stats.prompt["median"]
    none_cut = stats.suggestions["cut none"]
    assert stats.cut_at[none_cut.describe()] == 0
    assert stats.cut_at["max_source_length=100, max_target_length=100"] > 0
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile(list(range(1, 101)), 99) == 99
    assert describe([1, 3, 2, 4])["median"] == 2.5


@pytest.mark.skipif(not (shared_dir() / "data/seed_mixed/mixed_train_dataset.jsonl").is_file(),
                    reason="needs ../shared/data/seed_mixed (set GLMTUNE_SHARED)")
def test_tutorial_limits_on_the_shared_dataset_report_every_cut(tokenizer):
    samples, _ = load_samples(shared_dir() / "data/seed_mixed/mixed_train_dataset.jsonl")
    assert len(samples) == 902
    encoder = Encoder(tokenizer, PlainTemplate())  # the tutorials feed context/target without a chat template
    limits = LengthLimits(max_source_length=100, max_target_length=100)
    features, report = encode_samples(samples, encoder, limits, progress=False)
    lengths = [encoder.lengths(s)[0] for s in samples]
    expected = sum(src > 100 or tgt > 100 for src, tgt in lengths)
    assert report.samples_cut == expected > 0
    assert all(len(f["input_ids"]) <= 200 for f in features)
