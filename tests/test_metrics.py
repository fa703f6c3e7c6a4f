import pytest

from glmtune.evaluate.metrics import answer_kind, exact_match, parses_as, score_predictions

TRIPLES = '```json\n[{"subject": "A", "predicate": "作者", "object": "B", "subject_type": "图书作品", "object_type": "人物"}]\n```'


@pytest.mark.parametrize("reference, kind", [(TRIPLES, "extraction"), ('["手机"]', "classification"),
                                             ("一段文字", "text"), ("[]", "classification")])
def test_answer_kinds(reference, kind):
    assert answer_kind(reference) == kind


def test_parsing_is_checked_against_the_reference_shape():
    bare = TRIPLES.removeprefix("```json\n").removesuffix("\n```")
    assert parses_as(TRIPLES, "extraction") and parses_as(bare, "extraction")
    assert not parses_as('[{"subject": "A"}]', "extraction")  # no predicate/object
    assert not parses_as('```json\n[{"subject": "A",', "extraction")
    assert parses_as('["手机", "电脑"]', "classification") and not parses_as("手机", "classification")
    assert not parses_as("", "classification")


def test_scores_overall_and_per_kind():
    rows = [(TRIPLES, TRIPLES), ("胡说", TRIPLES), ('["手机"]', '["手机"]'), ('["电脑"]', '["手机"]'),
            ("", '["手机"]'), ("  答  ", "答")]
    scores = score_predictions(rows)
    assert scores["samples"] == 6
    assert scores["exact_match"] == pytest.approx(100 * 3 / 6)
    assert scores["parse_rate"] == pytest.approx(100 * 3 / 5)  # free text has no shape to parse
    assert scores["by_kind"]["extraction"] == {"samples": 2, "exact_match": 50.0, "parse_rate": 50.0}
    assert scores["by_kind"]["classification"]["parse_rate"] == pytest.approx(200 / 3)
    assert "parse_rate" not in scores["by_kind"]["text"]
    assert exact_match(" a\n", "a") and not exact_match("a", "b")
    assert score_predictions([]) == {"samples": 0}
