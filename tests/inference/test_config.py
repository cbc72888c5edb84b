"""Tests for arcfold.inference.config: search.target_recall (default, valid values, one-line errors)."""

from __future__ import annotations

import pytest

from arcfold.errors import ConfigError
from arcfold.inference.config import load_inference_config

REQUIRED = ["experiment=exp", "query.csv=q.csv", "gallery.csv=g.csv"]


def test_search_knob_defaults() -> None:
    search = load_inference_config(None, REQUIRED).search
    assert (search.target_recall, search.nprobe, search.ef_search) == (0.95, None, None)


@pytest.mark.parametrize(("value", "want"), [("null", None), ("1", 1.0), ("0.9", 0.9), ("1e-3", 0.001)])
def test_valid_target_recall(value: str, want: float | None) -> None:
    assert load_inference_config(None, [*REQUIRED, f"search.target_recall={value}"]).search.target_recall == want


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "0.0"])
def test_a_target_recall_outside_0_1_is_a_one_line_config_error(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_inference_config(None, [*REQUIRED, f"search.target_recall={value}"])
    assert str(err.value) == (
        f"invalid inference config: search.target_recall must be in (0, 1] or null (got {float(value)})"
    )


def test_a_target_recall_that_is_not_a_number_names_the_key() -> None:
    with pytest.raises(ConfigError, match="search.target_recall") as err:
        load_inference_config(None, [*REQUIRED, "search.target_recall=high"])
    assert "\n" not in str(err.value)


def test_several_problems_are_listed_one_per_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_inference_config(None, [*REQUIRED, "search.target_recall=2", "vote.mode=median"])
    assert str(err.value).splitlines() == [
        "invalid inference config:",
        "  search.target_recall must be in (0, 1] or null (got 2.0)",
        "  vote.mode must be max or sum (got 'median')",
    ]
