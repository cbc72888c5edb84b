"""Submission files: the three formats Kaggle retrieval/recognition competitions use, a validator, and scoring.

Formats (``submission.format``), one row per query, a header line, written atomically:

``retrieval`` (Google Landmarks Retrieval, SOP-style)
    ``id,images``: the query id, then the ranked gallery ids separated by spaces, best first. Scored by
    mAP@100 in the competitions; here by Recall@K (hit rate) and mAP@K over the listed ids.
``recognition`` (Google Landmarks Recognition)
    ``id,landmarks``: the query id, then ``"label confidence"`` (one predicted label and a real-valued
    confidence), or an empty field for "no prediction". Scored by GAP (below).
``top5`` (Happywhale, and any "MAP@5" competition)
    ``image,predictions``: the query id, then up to 5 labels separated by spaces, best first; the
    "new / unknown" label (``new_individual``) may be one of them. Scored by MAP@5 (below).

The header names default to the above and can be renamed (``id_header``, ``prediction_header``), as
competitions differ. Ids and labels are written as strings; an id or label containing a space, a comma
or a newline cannot be represented and is refused.

Metrics
-------
GAP, global average precision (Perronnin, Liu & Renders 2009; the Google Landmarks Recognition metric,
also called micro-AP). Each query gets at most one prediction with a confidence. Sort all predictions by
confidence, descending, and with ``M`` = the number of queries whose true label is a known class::

    GAP = (1/M) * sum_{i=1..P} precision(i) * rel(i)

where ``P`` is the number of predictions, ``precision(i)`` the fraction of correct predictions among the
first ``i`` and ``rel(i)`` = 1 if the i-th prediction is correct. A prediction for a query whose truth is
"no known class" (a distractor / new individual) is always wrong; leaving a query unpredicted costs
nothing in precision but its relevant item is never found. Ties in confidence keep the file's row order.

MAP@5 (Happywhale): each query scores ``1/rank`` of the first correct label among its first 5
predictions (0 if none), averaged over queries; a query whose truth is the new label is answered
correctly by predicting that label.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from arcfold.errors import SubmissionError
from arcfold.io import save_text

__all__ = [
    "DEFAULT_HEADERS",
    "FORMATS",
    "global_average_precision",
    "map_at_k",
    "read_submission",
    "retrieval_scores",
    "submission_frame",
    "validate_submission",
    "write_submission",
]

FORMATS = ("retrieval", "recognition", "top5")
DEFAULT_HEADERS: dict[str, tuple[str, str]] = {
    "retrieval": ("id", "images"),
    "recognition": ("id", "landmarks"),
    "top5": ("image", "predictions"),
}
_MAX_PROBLEMS = 10
_FORBIDDEN = (" ", ",", "\n", "\r", '"')


# --------------------------------------------------------------------------------------------------------------------
# metrics


def global_average_precision(
    predicted: Sequence, confidence: Sequence[float], truth: Sequence, *, known: Iterable | None = None
) -> float:
    """GAP (micro-AP) over one prediction per query; ``None`` (or NaN confidence) = no prediction.

    ``truth[i]`` is query i's true label; with ``known`` given, a truth outside it (e.g. ``"new_individual"``)
    is a query with nothing to find: it does not count in ``M`` and any prediction for it is wrong.

    >>> # 4 queries; sorted by confidence: right (P=1/1), wrong, right (P=2/3); M=3 (query 3 is a distractor)
    >>> gap = global_average_precision(["a", "x", "c", None], [0.9, 0.8, 0.7, None], ["a", "b", "c", "new"],
    ...                                known={"a", "b", "c"})
    >>> round(gap, 6)  # (1/1 + 2/3) / 3
    0.555556
    """
    predicted, truth = list(predicted), list(truth)
    conf = np.asarray(confidence, dtype=np.float64) if len(predicted) else np.zeros(0)
    if not (len(predicted) == len(conf) == len(truth)):
        raise ValueError(f"length mismatch: {len(predicted)} predictions, {len(conf)} confidences, {len(truth)} truths")
    known = set(known) if known is not None else None
    is_known = np.array([(t in known) if known is not None else t is not None for t in truth], dtype=bool)  # (Q,)
    n_relevant = int(is_known.sum())
    if n_relevant == 0:
        raise ValueError("GAP is undefined: no query has a known true label")
    made = np.array([p is not None and not math.isnan(c) for p, c in zip(predicted, conf, strict=True)], dtype=bool)
    rows = np.flatnonzero(made)
    order = rows[np.argsort(-conf[rows], kind="stable")]  # (P,) by confidence, ties in row order
    correct = np.array([is_known[i] and predicted[i] == truth[i] for i in order], dtype=np.float64)  # (P,)
    precision = np.cumsum(correct) / np.arange(1, len(order) + 1)
    return float((precision * correct).sum() / n_relevant)


def map_at_k(predictions: Sequence[Sequence], truth: Sequence, k: int = 5) -> float:
    """MAP@k with one true label per query: mean over queries of 1/rank of the first hit in the top k.

    >>> map_at_k([["a", "b"], ["x", "b", "c"], ["x", "y"], []], ["a", "b", "c", "d"], k=5)
    0.375
    """
    if len(predictions) != len(truth):
        raise ValueError(f"length mismatch: {len(predictions)} prediction rows, {len(truth)} truths")
    if len(truth) == 0:
        raise ValueError("no queries")
    total = 0.0
    for preds, t in zip(predictions, truth, strict=True):
        for rank, p in enumerate(list(preds)[:k], start=1):
            if p == t:
                total += 1.0 / rank
                break
    return total / len(truth)


def retrieval_scores(
    neighbour_labels: Sequence[Sequence],
    query_labels: Sequence,
    n_relevant: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K (hit rate) and, given ``n_relevant``, mAP@K of ranked retrieval lists given by labels (ragged ok).

    mAP@K is the Google Landmarks Retrieval form: ``AP@K = (1/min(m_q, K)) * sum_{i<=K} P(i) rel(i)`` with
    ``m_q = n_relevant[q]``, the number of relevant items in the gallery (queries with ``m_q = 0`` are skipped).

    >>> retrieval_scores([["a", "x", "a"], ["x", "b"]], ["a", "b"], n_relevant=[2, 1], ks=[1, 3])
    {'recall@1': 0.5, 'recall@3': 1.0, 'map@1': 0.5, 'map@3': 0.6666666666666666}
    """
    n = len(query_labels)
    if n == 0 or len(neighbour_labels) != n:
        raise ValueError(f"need one neighbour row per query: {len(neighbour_labels)} rows, {n} queries")
    rel = [
        np.array([lab == t for lab in row], dtype=np.float64)
        for row, t in zip(neighbour_labels, query_labels, strict=True)
    ]
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([r[:k].any() for r in rel]))
    if n_relevant is not None:
        m = np.asarray(n_relevant, dtype=np.int64)
        for k in ks:
            aps = []
            for r, m_q in zip(rel, m, strict=True):
                if m_q == 0:
                    continue
                r = r[:k]
                precision = np.cumsum(r) / np.arange(1, len(r) + 1)
                aps.append(float((precision * r).sum() / min(m_q, k)))
            out[f"map@{k}"] = float(np.mean(aps)) if aps else float("nan")
    return out


# --------------------------------------------------------------------------------------------------------------------
# building, writing, reading, validating


@dataclass(frozen=True)
class _Spec:
    format: str
    id_header: str
    prediction_header: str


def _spec(fmt: str, id_header: str | None, prediction_header: str | None) -> _Spec:
    if fmt not in FORMATS:
        raise SubmissionError(f"unknown submission format {fmt!r}; choose one of {', '.join(FORMATS)}")
    default_id, default_pred = DEFAULT_HEADERS[fmt]
    return _Spec(fmt, id_header or default_id, prediction_header or default_pred)


def _check_token(value: str, what: str) -> str:
    value = str(value)
    if value == "" or any(c in value for c in _FORBIDDEN):
        raise SubmissionError(f"{what} {value!r} cannot be written in a submission (empty, or has a space/comma/quote)")
    return value


def submission_frame(
    fmt: str,
    query_ids: Sequence,
    predictions: Sequence[Sequence],
    confidences: Sequence[float | None] | None = None,
    *,
    id_header: str | None = None,
    prediction_header: str | None = None,
) -> pd.DataFrame:
    """The submission as a frame of strings.

    ``predictions[i]``: gallery ids (retrieval) or labels (recognition: only the first is used; top5: the first
    five), best first; ``None`` entries are skipped. ``confidences[i]`` (recognition): the first label's score.
    """
    spec = _spec(fmt, id_header, prediction_header)
    if len(query_ids) != len(predictions):
        raise SubmissionError(f"{len(query_ids)} query ids but {len(predictions)} prediction rows")
    cells = []
    for i, row in enumerate(predictions):
        row = [_check_token(p, "prediction") for p in row if p is not None and not (isinstance(p, float) and p != p)]
        if fmt == "recognition":
            conf = None if confidences is None else confidences[i]
            if not row or conf is None or not math.isfinite(float(conf)):
                cells.append("")
            else:
                cells.append(f"{row[0]} {float(conf):.6f}")
        elif fmt == "top5":
            cells.append(" ".join(row[:5]))
        else:
            cells.append(" ".join(row))
    return pd.DataFrame(
        {spec.id_header: [_check_token(q, "query id") for q in query_ids], spec.prediction_header: cells}
    )


def write_submission(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write atomically (temp file + rename); returns the path."""
    path = Path(path)
    save_text(path, frame.to_csv(index=False, lineterminator="\n"))
    return path


def read_submission(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV file: {e}") from None


def validate_submission(
    submission: pd.DataFrame | str | Path,
    fmt: str,
    query_ids: Sequence,
    *,
    gallery_ids: Iterable | None = None,
    labels: Iterable | None = None,
    new_label: str | None = None,
    id_header: str | None = None,
    prediction_header: str | None = None,
    max_predictions: int | None = None,
    min_predictions: int | None = None,
) -> None:
    """Refuse a broken submission: every query exactly once, no unknown ids/labels, each cell well formed.

    ``gallery_ids`` (retrieval) and ``labels`` (recognition, top5; ``new_label`` is also allowed in top5) are
    what predictions may contain; ``None`` skips that check. ``min_predictions`` (retrieval, top5): every row must
    list at least that many distinct ids/labels (inference asks 5 of a top5 file: an empty slot is a lost chance
    at MAP@5). Raises :class:`SubmissionError` listing up to 10 problems, each with its CSV line and column.

    Every rule of the submission formats in order, in one place (a rule per block).
    """
    source = str(submission) if not isinstance(submission, pd.DataFrame) else "submission"
    frame = submission if isinstance(submission, pd.DataFrame) else read_submission(submission)
    spec = _spec(fmt, id_header, prediction_header)
    expected = [spec.id_header, spec.prediction_header]
    if list(frame.columns) != expected:
        raise SubmissionError(f"{source}: header must be {','.join(expected)}, got {','.join(map(str, frame.columns))}")
    ids = frame[spec.id_header].astype(str)
    problems: list[str] = []

    def where(row: int) -> str:
        return f"line {row + 2}"  # + header, 1-based

    wanted = pd.Index([str(q) for q in query_ids])
    for row in np.flatnonzero(ids.duplicated().to_numpy()):
        problems.append(f"{where(row)}, column '{spec.id_header}': query id {ids.iat[row]!r} appears more than once")
    unknown = ~ids.isin(wanted)
    for row in np.flatnonzero(unknown.to_numpy()):
        problems.append(f"{where(row)}, column '{spec.id_header}': {ids.iat[row]!r} is not a query id")
    missing = wanted[~wanted.isin(ids)]
    if len(missing):
        shown = ", ".join(repr(m) for m in missing[:5])
        problems.append(f"{len(missing)} query id(s) have no row, e.g. {shown}")

    allowed: set[str] | None = None
    if fmt == "retrieval" and gallery_ids is not None:
        allowed = {str(g) for g in gallery_ids}
    elif fmt != "retrieval" and labels is not None:
        allowed = {str(lab) for lab in labels} | ({str(new_label)} if new_label and fmt == "top5" else set())
    what = "gallery id" if fmt == "retrieval" else "label"
    for row, cell in enumerate(frame[spec.prediction_header].astype(str)):
        col = f"{where(row)}, column '{spec.prediction_header}'"
        tokens = cell.split()
        if fmt == "recognition":
            if not tokens:
                continue  # no prediction for this query is allowed
            if len(tokens) != 2:
                problems.append(f"{col}: expected 'label confidence', got {cell!r}")
                continue
            try:
                conf = float(tokens[1])
            except ValueError:
                problems.append(f"{col}: confidence {tokens[1]!r} is not a number")
                continue
            if not math.isfinite(conf):
                problems.append(f"{col}: confidence {tokens[1]!r} is not finite")
            tokens = tokens[:1]
        elif not tokens:
            problems.append(f"{col}: empty prediction")
            continue
        limit = 5 if fmt == "top5" else max_predictions
        if limit is not None and len(tokens) > limit:
            problems.append(f"{col}: {len(tokens)} predictions, at most {limit} allowed")
        if fmt != "recognition" and min_predictions is not None and len(tokens) < min_predictions:
            problems.append(f"{col}: {len(tokens)} prediction(s), {min_predictions} expected")
        if len(set(tokens)) != len(tokens):
            problems.append(f"{col}: the same {what} is listed twice")
        if allowed is not None:
            bad = [t for t in tokens if t not in allowed]
            if bad:
                problems.append(f"{col}: unknown {what}(s) {', '.join(map(repr, bad[:3]))}")
        if len(problems) > _MAX_PROBLEMS:
            break
    if problems:
        more = f"\n  ... ({len(problems) - _MAX_PROBLEMS} more)" if len(problems) > _MAX_PROBLEMS else ""
        raise SubmissionError(f"{source}: invalid {fmt} submission:\n  " + "\n  ".join(problems[:_MAX_PROBLEMS]) + more)
