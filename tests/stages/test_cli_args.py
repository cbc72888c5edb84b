"""Command lines as people type them: ``key=value`` overrides before, between and after the options."""

from __future__ import annotations

import importlib

import pytest

import arcfold.config
import arcfold.inference.config
import arcfold.stages.cli
import arcfold.training.tune

from ..conftest import REPO

CONFIG = str(REPO / "configs" / "glyphs_arcface.yaml")


class _Parsed(Exception):
    """Raised by the stand-ins below once a stage hands its overrides on: the command line was parsed."""


@pytest.mark.parametrize(
    "stage, argv",
    [
        ("train", ["-c", CONFIG, "train.epochs=1", "--fold", "0", "data.image_size=32"]),
        ("train", ["train.epochs=1", "--fold", "0", "-c", CONFIG, "data.image_size=32"]),
        ("folds", ["train.epochs=1", "--config", CONFIG, "--force", "data.image_size=32"]),
        ("score", ["train.epochs=1", "-c", CONFIG, "--recompute", "data.image_size=32"]),
        ("test", ["train.epochs=1", "-c", CONFIG, "--force", "data.image_size=32"]),
        ("tune", ["train.epochs=1", "-c", CONFIG, "-s", "space.yaml", "-n", "2", "data.image_size=32"]),
        ("infer", ["train.epochs=1", "-c", "inference.yaml", "data.image_size=32"]),
    ],
)
def test_overrides_may_come_before_between_and_after_the_options(stage, argv, monkeypatch):
    seen = []

    def record(*args, overrides=None, **kwargs):
        seen.append(list(overrides if overrides is not None else args[-1]))
        raise _Parsed

    for module, name in [
        (arcfold.config, "load_config"),
        (arcfold.stages.cli, "load_config"),
        (arcfold.training.tune, "tune"),
        (arcfold.inference.config, "load_inference_config"),
    ]:
        monkeypatch.setattr(module, name, record)
    main = importlib.import_module(f"arcfold.stages.{stage}").main
    with pytest.raises(_Parsed):  # not argparse's SystemExit 2 ("unrecognized arguments")
        main(argv)
    assert seen == [["train.epochs=1", "data.image_size=32"]]
