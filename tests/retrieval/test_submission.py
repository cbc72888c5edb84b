"""Submission formats, the validator, and the GAP / MAP@5 / retrieval metrics against hand-computed cases."""

from __future__ import annotations

import doctest

import pandas as pd
import pytest

import arcfold.retrieval.submission
from arcfold.errors import SubmissionError
from arcfold.retrieval.submission import (
    global_average_precision,
    map_at_k,
    read_submission,
    retrieval_scores,
    submission_frame,
    validate_submission,
    write_submission,
)


def test_doctests() -> None:
    result = doctest.testmod(arcfold.retrieval.submission)
    assert result.attempted >= 3 and result.failed == 0


# ---------------------------------------------------------------------------------------------------------- metrics


def test_gap_hand_computed() -> None:
    # 5 queries, truths a b c d new; predictions sorted by confidence:
    #   q1 "a" 0.9 right  P=1/1
    #   q4 "x" 0.8 wrong
    #   q5 "b" 0.7 wrong (its truth is new: any prediction is wrong)
    #   q2 "b" 0.6 right  P=2/4
    #   q3 no prediction
    # M = 4 known-truth queries -> GAP = (1 + 1/2) / 4 = 0.375
    gap = global_average_precision(
        ["a", "b", None, "x", "b"],
        [0.9, 0.6, None, 0.8, 0.7],
        ["a", "b", "c", "d", "new"],
        known={"a", "b", "c", "d"},
    )
    assert gap == pytest.approx(0.375)


def test_gap_is_one_for_perfect_predictions_and_rewards_confident_right_answers() -> None:
    truth = ["a", "b", "c"]
    assert global_average_precision(truth, [0.1, 0.2, 0.3], truth) == pytest.approx(1.0)
    # one wrong answer: ranking it last (low confidence) scores higher than ranking it first
    good = global_average_precision(["a", "b", "x"], [0.9, 0.8, 0.1], truth)
    bad = global_average_precision(["a", "b", "x"], [0.1, 0.2, 0.9], truth)
    assert good == pytest.approx(2 / 3) and bad == pytest.approx((1 / 2 + 2 / 3) / 3)


def test_gap_needs_a_known_truth() -> None:
    with pytest.raises(ValueError, match="no query has a known true label"):
        global_average_precision(["a"], [1.0], ["new"], known={"a"})


def test_map_at_5_hand_computed() -> None:
    preds = [["a", "b", "c", "d", "e"], ["x", "new_individual"], ["x", "x2", "x3", "x4", "x5", "c"], ["b"]]
    truth = ["a", "new_individual", "c", "a"]
    # 1 + 1/2 + 0 (c is 6th) + 0 = 1.5 / 4
    assert map_at_k(preds, truth, k=5) == pytest.approx(0.375)


def test_retrieval_scores_hand_computed() -> None:
    rows = [["a", "b", "a", "a"], ["c", "c", "b", "b"]]
    out = retrieval_scores(rows, ["a", "b"], n_relevant=[3, 2], ks=[1, 4])
    assert out["recall@1"] == 0.5 and out["recall@4"] == 1.0
    # q1: hits at 1,3,4 -> (1 + 2/3 + 3/4) / min(3, 4); q2: hits at 3,4 -> (1/3 + 2/4) / 2
    assert out["map@4"] == pytest.approx(((1 + 2 / 3 + 3 / 4) / 3 + (1 / 3 + 1 / 2) / 2) / 2)
    assert out["map@1"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- frames and round trip


def test_each_format_round_trips_and_validates(tmp_path) -> None:
    ids = ["q1", "q2"]
    cases = {
        "retrieval": ([["g3", "g1"], ["g2"]], None, "id,images\nq1,g3 g1\nq2,g2\n"),
        "recognition": ([["cat", "dog"], []], [0.75, None], "id,landmarks\nq1,cat 0.750000\nq2,\n"),
        "top5": ([list("abcdef"), ["new_individual"]], None, "image,predictions\nq1,a b c d e\nq2,new_individual\n"),
    }
    for fmt, (preds, conf, text) in cases.items():
        path = write_submission(tmp_path / f"{fmt}.csv", submission_frame(fmt, ids, preds, conf))
        assert path.read_text() == text
        validate_submission(
            read_submission(path),
            fmt,
            ids,
            gallery_ids=["g1", "g2", "g3"],
            labels=["a", "b", "c", "d", "e", "cat", "dog"],
            new_label="new_individual",
        )


def test_headers_can_be_renamed() -> None:
    frame = submission_frame("top5", ["q"], [["a"]], id_header="image_id", prediction_header="labels")
    assert list(frame.columns) == ["image_id", "labels"]
    validate_submission(frame, "top5", ["q"], id_header="image_id", prediction_header="labels")
    with pytest.raises(SubmissionError, match="header must be image,predictions"):
        validate_submission(frame, "top5", ["q"])


def test_ids_that_cannot_be_written_are_refused() -> None:
    with pytest.raises(SubmissionError, match="has a space"):
        submission_frame("retrieval", ["q 1"], [["g"]])
    with pytest.raises(SubmissionError, match="unknown submission format"):
        submission_frame("csv", ["q"], [["g"]])


# ------------------------------------------------------------------------------------------------------ validator


@pytest.mark.parametrize(
    ("fmt", "text", "message"),
    [
        ("retrieval", "id,images\nq1,g1\n", r"1 query id\(s\) have no row, e.g. 'q2'"),
        ("retrieval", "id,images\nq1,g1\nq2,g2\nq1,g2\n", "line 4, column 'id': query id 'q1' appears more than once"),
        ("retrieval", "id,images\nq1,g1\nq2,g2\nq9,g1\n", "line 4, column 'id': 'q9' is not a query id"),
        ("retrieval", "id,images\nq1,g1 g7\nq2,g2\n", "line 2, column 'images': unknown gallery id.*'g7'"),
        ("retrieval", "id,images\nq1,g1 g1\nq2,g2\n", "line 2, column 'images': the same gallery id is listed twice"),
        ("retrieval", "id,images\nq1,\nq2,g2\n", "line 2, column 'images': empty prediction"),
        ("retrieval", "id,neighbours\nq1,g1\nq2,g2\n", "header must be id,images"),
        ("recognition", "id,landmarks\nq1,a\nq2,\n", "line 2, column 'landmarks': expected 'label confidence'"),
        ("recognition", "id,landmarks\nq1,a high\nq2,\n", "confidence 'high' is not a number"),
        ("recognition", "id,landmarks\nq1,a nan\nq2,\n", "confidence 'nan' is not finite"),
        ("recognition", "id,landmarks\nq1,zebra 0.5\nq2,\n", "unknown label.*'zebra'"),
        ("top5", "image,predictions\nq1,a b a\nq2,b\n", "the same label is listed twice"),
        ("top5", "image,predictions\nq1,a b c d e a2\nq2,b\n", "6 predictions, at most 5 allowed"),
    ],
)
def test_validator_refuses_broken_files(tmp_path, fmt, text, message) -> None:
    path = tmp_path / "sub.csv"
    path.write_text(text)
    with pytest.raises(SubmissionError, match=message):
        validate_submission(
            path, fmt, ["q1", "q2"], gallery_ids=["g1", "g2"], labels=["a", "b", "c", "d", "e", "a2"], new_label="new"
        )


def test_validator_min_predictions_refuses_short_rows() -> None:
    frame = pd.DataFrame({"image": ["q1", "q2"], "predictions": ["a b c d e", "new a b c"]})
    with pytest.raises(SubmissionError, match=r"line 3, column 'predictions': 4 prediction\(s\), 5 expected"):
        validate_submission(frame, "top5", ["q1", "q2"], labels=list("abcde"), new_label="new", min_predictions=5)
    validate_submission(frame, "top5", ["q1", "q2"], labels=list("abcde"), new_label="new")  # not asked: fine
    frame = pd.DataFrame({"id": ["q1"], "landmarks": [""]})  # recognition: one label or none, never counted
    validate_submission(frame, "recognition", ["q1"], labels=["a"], min_predictions=5)


def test_validator_accepts_the_new_label_only_in_top5() -> None:
    frame = pd.DataFrame({"image": ["q1"], "predictions": ["new a"]})
    validate_submission(frame, "top5", ["q1"], labels=["a"], new_label="new")
    frame = pd.DataFrame({"id": ["q1"], "landmarks": ["new 0.9"]})
    with pytest.raises(SubmissionError, match="unknown label"):
        validate_submission(frame, "recognition", ["q1"], labels=["a"], new_label="new")


def test_unreadable_submission_names_the_file(tmp_path) -> None:
    with pytest.raises(SubmissionError, match="file not found"):
        read_submission(tmp_path / "missing.csv")
