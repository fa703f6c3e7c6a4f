"""Metric definitions, checked against values worked out by hand and against the ChatGLM evaluation's calls."""

import json
import math
import subprocess
import sys

import pytest

from glmtune.evaluate.metrics import bleu4, compute_metrics, detect_task, exact_match, metrics_table, rouge_scores
from glmtune.paths import shared_dir

MIXED_DEV = shared_dir() / "data/seed_mixed/mixed_dev_dataset.jsonl"
ROUGE = ("rouge-1", "rouge-2", "rouge-l")


def triple(s, p, o, **extra):
    return {"subject": s, "predicate": p, "object": o, **extra}


def fenced(value):
    return "```json\n" + json.dumps(value, ensure_ascii=False) + "\n```"


@pytest.mark.parametrize("target, task", [
    (fenced([triple("A", "作者", "B", subject_type="图书作品", object_type="人物")]), "extraction"),
    (json.dumps([triple("A", "作者", "B")]), "extraction"),
    ('["手机"]', "classification"), ("[]", "classification"), ("```json\n[]\n```", "classification"),
    ('[{"subject": "A"}]', "generation"),  # objects, but not triples
    ("一段文字", "generation"), ("", "generation")])
def test_the_task_comes_from_the_target_shape(target, task):
    assert detect_task(target) == task


def test_extraction_scores_the_set_of_triples_micro_averaged():
    rows = [
        # Gold {T1, T2}; the bare prediction repeats T1 and gets T2's object wrong: predicted {T1, T2'}.
        # TP 1, predicted 2, gold 2.
        (json.dumps([triple("A", "作者", "B"), triple("A", "作者", "B"), triple("C", "导演", "E")]),
         fenced([triple("A", "作者", "B", subject_type="图书作品"), triple("C", "导演", "D")])),
        # Malformed JSON: does not parse, predicts nothing; gold 1.
        ('```json\n[{"subject": "X",', fenced([triple("X", "歌手", "Y")])),
        # Empty answer: does not parse; gold has a duplicate, so the gold set is {T4, T5}: gold 2.
        ("", fenced([triple("P", "主演", "Q"), triple("P", "主演", "Q"), triple("P", "导演", "R")])),
        # Fenced, padded strings, no type keys: {(书, 出版社, 社)} matches. TP 1, predicted 1, gold 1.
        (fenced([triple(" 书 ", "出版社", "社 ")]),
         fenced([triple("书", "出版社", "社", object_type="出版社")])),
    ]
    scores = compute_metrics(rows)
    extraction = scores["tasks"]["extraction"]
    # TP 2, predicted 3, gold 6: precision 2/3, recall 2/6, F1 2*2/(3+6) = 4/9; rows 1 and 4 parse: 2/4.
    assert extraction["precision"] == pytest.approx(66.6667)
    assert extraction["recall"] == pytest.approx(33.3333)
    assert extraction["f1"] == pytest.approx(44.4444)
    assert extraction["parse_rate"] == 50.0
    assert extraction["exact_match"] == 0.0 and extraction["samples"] == 4
    assert list(scores["tasks"]) == ["extraction"] and scores["samples"] == 4


def test_classification_accuracy_is_an_exact_set_match_and_f1_is_micro():
    rows = [('["手机"]', '["手机"]'),                   # equal: TP 1
            ('["电脑", "手机", "手机"]', '["手机", "电脑"]'),  # same set: TP 2
            ('["外卖", "酒店"]', '["外卖"]'),             # TP 1, FP 1
            ("酒店", '["酒店"]'),                        # not JSON: FN 1
            ('[" 书籍 "]', '["书籍"]')]                  # stripped: TP 1
    classification = compute_metrics(rows)["tasks"]["classification"]
    # Accuracy 3/5 (rows 1, 2, 5); TP 5, FP 1, FN 1: micro F1 = 2*5 / (2*5 + 1 + 1) = 10/12; 4 of 5 parse.
    assert classification["accuracy"] == 60.0
    assert classification["micro_f1"] == pytest.approx(83.3333)
    assert classification["parse_rate"] == 80.0
    assert classification["exact_match"] == 20.0  # only row 1 is the same text


def test_bleu4_on_characters_with_smoothing_method3():
    # Every n-gram of "我爱NLP" is in "我爱NLP!": all precisions 1; brevity penalty exp(1 - 6/5).
    assert bleu4("我爱NLP", "我爱NLP!") == pytest.approx(100 * math.exp(-0.2))
    # "ab猫" vs "ab狗": p1 2/3, p2 1/2, p3 0/1 -> 1/(2*1), p4 no 4-grams -> 0/1 -> 1/(4*1); equal lengths.
    assert bleu4("ab猫", "ab狗") == pytest.approx(100 * (2 / 3 * 1 / 2 * 1 / 2 * 1 / 4) ** 0.25)
    # 13 vs 11 characters (spaces count): p1 7/13, p2 5/12, p3 3/11 (我喜欢, 喜欢_, _编程), p4 1/10 (我喜欢_).
    expected = 100 * (7 / 13 * 5 / 12 * 3 / 11 * 1 / 10) ** 0.25
    assert bleu4("我喜欢 Python 编程", "我喜欢 Java 编程") == pytest.approx(expected)
    assert bleu4("hello世界!", "hello世界!") == pytest.approx(100.0)


def test_rouge_on_jieba_words():
    # 我/爱/北京 vs 我/爱/上海: unigrams 2 of 3, bigrams 1 of 2 (我爱), LCS 2 of 3.
    assert rouge_scores("我爱北京", "我爱上海") == pytest.approx(
        {"rouge-1": 200 / 3, "rouge-2": 50.0, "rouge-l": 200 / 3}, abs=1e-5)
    # 我/喜欢/Python/编程 vs 我/喜欢/Java/编程 (the spaces jieba keeps collapse): 3 of 4, 1 of 3, LCS 3 of 4.
    assert rouge_scores("我喜欢 Python 编程", "我喜欢 Java 编程") == pytest.approx(
        {"rouge-1": 75.0, "rouge-2": 100 / 3, "rouge-l": 75.0}, abs=1e-5)


@pytest.mark.parametrize("prediction, target",
                         [("", "我爱北京"), ("  \n", "我爱北京"), ("我爱北京", ""), ("", "")])
def test_empty_sides_score_zero(prediction, target):
    assert bleu4(prediction, target) == 0.0
    assert rouge_scores(prediction, target) == dict.fromkeys(ROUGE, 0.0)
    overall = compute_metrics([(prediction, target)])["overall"]
    assert overall["bleu-4"] == overall["rouge-1"] == overall["rouge-l"] == 0.0


def test_mixed_files_get_results_per_task_and_overall():
    answer = fenced([triple("A", "作者", "B")])
    rows = [('["手机"]', '["手机"]'), ("我爱北京", "我爱上海"), (answer, answer)]
    scores = compute_metrics(iter(rows))
    assert scores["samples"] == 3 and scores["task"] == "auto"
    assert list(scores["tasks"]) == ["extraction", "classification", "generation"]
    assert scores["overall"]["exact_match"] == pytest.approx(66.6667)
    assert scores["overall"]["rouge-2"] == pytest.approx((100 + 50 + 100) / 3, abs=1e-4)  # per-row mean
    assert set(scores["tasks"]["generation"]) == {"samples", "exact_match", "bleu-4", *ROUGE}
    json.dumps(scores)
    table = metrics_table(scores)
    assert table.splitlines()[0].split() == ["metric", "overall", "extraction", "classification", "generation"]
    assert "micro F1" in table and "BLEU-4" in table


def test_a_forced_task_applies_to_every_row():
    rows = [("一段文字", "另一段文字"), ("[]", '["手机"]')]
    forced = compute_metrics(rows, task="extraction")
    # No target is a list of triples: gold is empty; "[]" parses as (no) triples, the text does not.
    assert list(forced["tasks"]) == ["extraction"] and forced["task"] == "extraction"
    assert forced["tasks"]["extraction"]["f1"] == 0.0 and forced["tasks"]["extraction"]["parse_rate"] == 50.0
    generation = compute_metrics(rows, task="generation")
    assert list(generation["tasks"]) == ["generation"] and "accuracy" not in generation["tasks"]["generation"]
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics(rows, task="qa")


def test_empty_input_and_exact_match():
    assert compute_metrics([]) == {"samples": 0, "task": "auto", "overall": {}, "tasks": {}}
    assert metrics_table(compute_metrics([])) == "no samples to score"
    assert exact_match(" a\n", "a") and not exact_match("a", "b")
    # An answer cut off before its closing fence still parses.
    assert compute_metrics([('```json\n["手机"]', '["手机"]')])["tasks"]["classification"]["accuracy"] == 100.0


@pytest.mark.skipif(not MIXED_DEV.is_file(), reason="shared/ data not available")
def test_bleu_and_rouge_equal_the_chatglm_evaluation_on_real_rows():
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    rows = [json.loads(line)["target"] for line in MIXED_DEV.read_text(encoding="utf-8").splitlines()]
    targets = rows[:3] + rows[59:62]  # three extraction rows, three classification rows
    predictions = [rows[1], rows[0][: len(rows[0]) // 2], rows[2][::-1], rows[60], rows[59], "我觉得是" + rows[61]]
    official = []
    for prediction, target in zip(predictions, targets):  # ptuning/main.py compute_metrics, call for call
        scores = Rouge().get_scores(" ".join(jieba.cut(prediction)), " ".join(jieba.cut(target)))[0]
        expected = {k: scores[k]["f"] * 100 for k in ROUGE}
        expected["bleu-4"] = sentence_bleu([list(target)], list(prediction),
                                           smoothing_function=SmoothingFunction().method3) * 100
        assert rouge_scores(prediction, target) == pytest.approx({k: expected[k] for k in ROUGE})
        assert bleu4(prediction, target) == pytest.approx(expected["bleu-4"])
        assert 0 < expected["bleu-4"] < 100
        official.append(expected)
    overall = compute_metrics(zip(predictions, targets))["overall"]
    for key in ("bleu-4", *ROUGE):
        assert overall[key] == pytest.approx(sum(row[key] for row in official) / len(official), abs=1e-4)


def test_no_work_at_import_and_no_noise_on_stdout():
    code = ("import sys; import glmtune.evaluate.metrics as m\n"
            "assert not {'jieba', 'nltk', 'rouge_chinese'} & set(sys.modules)\n"
            "m.compute_metrics([('我爱北京', '我爱上海')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "Building prefix dict" not in done.stderr
