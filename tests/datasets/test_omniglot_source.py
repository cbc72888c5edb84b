"""Omniglot without its zips: the error says which files, where they come from and how to point at them
(runs without ../shared/data/omniglot, unlike tests/datasets/test_omniglot.py)."""

from __future__ import annotations

import logging

import pytest

from arcfold.datasets.omniglot import prepare_omniglot
from arcfold.stages import prepare
from arcfold.stages.cli import run_cli


def test_missing_zips_name_the_files_the_repository_and_the_flag(tmp_path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"images_background_small1\.zip.*brendenlake/omniglot.*--source"):
        prepare_omniglot(empty, tmp_path / "out")
    with caplog.at_level(logging.ERROR, logger="arcfold"):
        code = run_cli(prepare.main, ["omniglot", "--source", str(empty), "--out", str(tmp_path / "out")])
    assert code == 2 and "python/images_background_small2.zip of https://github.com/brendenlake/omniglot" in caplog.text
    assert not (tmp_path / "out").exists()
