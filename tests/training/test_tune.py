"""Tune: search spaces, a real resumable study on the glyph set, pruning, interrupted and killed trials."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
import yaml

import arcfold.training.finalize
import arcfold.training.paths
import arcfold.training.tune
from arcfold.__main__ import main as arcfold_main
from arcfold.config import load_config
from arcfold.errors import ConfigError
from arcfold.training.tune import load_space, tune

from ..conftest import REPO, TINY, tmp_path_overrides

CONFIG = str(REPO / "configs" / "glyphs_arcface.yaml")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _load(tmp_path, study: str = "space") -> optuna.Study:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'oof' / 'tune' / f'{study}.db'}")


# --------------------------------------------------------------------------------------------
# search space


def test_space_problems_are_reported_together(tmp_path):
    path = _space(
        tmp_path,
        "optim.lr: {type: float, low: 0.01, high: 0.001}\n"
        "head.margin: {type: floats, low: 0.1, high: 0.5}\n"
        "head.scale: {type: categorical, choices: []}\n"
        "train.epochs: {type: int, low: 1, high: 4, lg: true}\n",
    )
    with pytest.raises(ConfigError) as e:
        load_space(path)
    message = str(e.value)
    assert "optim.lr: low must be < high" in message and "head.margin: needs type" in message
    assert "head.scale: categorical needs a non-empty list" in message and "unknown field(s) lg" in message


def test_misspelt_config_key_fails_before_training(tmp_path):
    path = _space(tmp_path, "optim.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        tune(CONFIG, path, 1, overrides=tmp_path_overrides(tmp_path))
    assert not (tmp_path / "oof" / "tune").exists()


# --------------------------------------------------------------------------------------------
# a real study: tiny trainings on the glyph set


@pytest.mark.slow
def test_real_study_resumes_and_writes_the_best_config(tmp_path, glyphs_input):
    space = _space(
        tmp_path,
        "optim.lr: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}\n"
        "head.margin: {type: categorical, choices: [0.2, 0.35]}\n",
    )
    overrides = [
        *tmp_path_overrides(tmp_path),
        f"data.input_dir={glyphs_input}",
        *TINY,
        "train.epochs=1",
        "train.limit_train_batches=2",
        "data.check_images=none",
    ]
    out = tmp_path / "tuned" / "best.yaml"
    args = ["tune", "-c", CONFIG, "-s", str(space), "--folds", "0", "--out", str(out), *overrides]
    assert arcfold_main([*args, "--trials", "1"]) == 0
    assert len(_load(tmp_path).trials) == 1
    assert arcfold_main([*args, "--trials", "2"]) == 0  # resumes: one more trial, not two

    study = _load(tmp_path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.user_attrs["experiment"] for t in study.trials] == ["space_t0", "space_t1"]
    for t in study.trials:  # each trial is a real experiment whose score is the objective
        scores = (tmp_path / "oof" / t.user_attrs["experiment"] / "fold0.json").read_text()
        assert t.value == pytest.approx(yaml.safe_load(scores)["recall@1"])
        trained = yaml.safe_load((tmp_path / "oof" / t.user_attrs["experiment"] / "fold0.config.yaml").read_text())
        assert trained["optim"]["lr"] == pytest.approx(t.params["optim.lr"])
        assert trained["head"]["margin"] == t.params["head.margin"]
    assert study.trials[0].params != study.trials[1].params  # the resumed sampler did not replay trial 0

    best = study.best_trial
    cfg = load_config(out)  # extends the original config, with the fixed overrides and the best values
    assert cfg.name == "space_best" and cfg.model.backbone == "resnet10t" and cfg.train.epochs == 1
    assert cfg.optim.lr == pytest.approx(best.params["optim.lr"]) and cfg.head.margin == best.params["head.margin"]
    assert (out.parent / yaml.safe_load(out.read_text())["base"]).resolve() == Path(CONFIG).resolve()

    # asking the same study for another metric is refused, not mixed in
    with pytest.raises(ConfigError, match="was made with another metric"):
        tune(CONFIG, space, 3, metric="map@r", overrides=overrides, out_path=out)


# --------------------------------------------------------------------------------------------
# study mechanics, with a stand-in for train_fold (fast)


class FakeTraining:
    """Replaces ``train_fold``: 'trains' ``train.epochs`` epochs whose Recall@1 is the margin (with ``curve``: the
    margin times the fraction of the schedule done, reaching the margin at the last epoch), passing each epoch's
    row to ``on_epoch_end`` as the real loop does."""

    def __init__(self, interrupt_on_call: int | None = None, curve: bool = False) -> None:
        self.calls: list[tuple[str, float, bool]] = []
        self.interrupt_on_call, self.curve = interrupt_on_call, curve

    def __call__(self, cfg, fold, on_epoch_end=None):
        self.calls.append((cfg.name, cfg.head.margin, cfg.train.resume))
        if self.interrupt_on_call == len(self.calls):
            raise KeyboardInterrupt
        paths = arcfold.training.paths.FoldPaths(cfg, fold)
        paths.work.mkdir(parents=True, exist_ok=True)
        history = []
        for epoch in range(cfg.train.epochs):
            paths.last.write_bytes(b"checkpoint")
            recall = cfg.head.margin * ((epoch + 1) / cfg.train.epochs if self.curve else 1.0)
            history.append({"epoch": epoch, "recall@1": recall, "map@r": recall / 2})
            arcfold.training.finalize.save_history(paths.history, history)
            if on_epoch_end is not None:
                on_epoch_end(history[-1])
        return {"recall@1": cfg.head.margin, "map@r": cfg.head.margin / 2}


@pytest.fixture
def fake_training(monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(arcfold.training.tune, "train_fold", fake)
    return fake


MARGINS = "head.margin: {type: categorical, choices: [0.1, 0.2, 0.3, 0.4, 0.5]}\n"


def test_trials_below_the_median_are_pruned_after_the_first_epoch(tmp_path, fake_training):
    overrides = [*tmp_path_overrides(tmp_path), "train.epochs=3"]
    study = tune(CONFIG, _space(tmp_path, MARGINS), 12, overrides=overrides, out_path=tmp_path / "best.yaml")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 12 and pruned and len(complete) >= 3
    for t in pruned:
        # reported epochs 0 and 1 (steps: per mille of the 3-epoch schedule), stopped at 1: never at the first epoch
        assert sorted(t.intermediate_values) == [333, 667]
        earlier = [c.value for c in complete if c.number < t.number]
        assert t.params["head.margin"] < sorted(earlier)[len(earlier) // 2] + 1e-9  # below the median
        work = tmp_path / "models" / t.user_attrs["experiment"] / "fold0"
        assert (work / "history.csv").is_file() and not (work / "last.pt").exists()  # checkpoints removed
    assert all(len(c.intermediate_values) == 3 for c in complete)
    assert study.best_trial.params["head.margin"] == 0.5
    assert load_config(tmp_path / "best.yaml").head.margin == 0.5

    no_prune = tune(
        CONFIG,
        _space(tmp_path, MARGINS),
        6,
        study_name="np",
        prune=False,
        overrides=overrides,
        out_path=tmp_path / "np.yaml",
    )
    assert {t.state for t in no_prune.trials} == {optuna.trial.TrialState.COMPLETE}


def test_the_pruner_compares_trials_of_different_lengths_at_the_same_fraction_of_their_schedule(tmp_path, monkeypatch):
    """train.epochs searched: three 2-epoch trials finish at 0.3; a 4-epoch trial that ends at 0.5 has 0.25 after
    its 2nd epoch, below the others' end (0.3), but above them half-way through their schedule (0.15). Compared
    at the same epoch index it was pruned; compared at the same fraction of the schedule it finishes, the best."""
    monkeypatch.setattr(arcfold.training.tune, "train_fold", FakeTraining(curve=True))
    space = _space(
        tmp_path,
        "train.epochs: {type: categorical, choices: [2, 4]}\nhead.margin: {type: categorical, choices: [0.3, 0.5]}\n",
    )
    (tmp_path / "oof" / "tune").mkdir(parents=True)
    storage = f"sqlite:///{tmp_path / 'oof' / 'tune' / 'space.db'}"
    study = optuna.create_study(study_name="space", storage=storage, direction="maximize")
    for params in [{"train.epochs": 2, "head.margin": 0.3}] * 3 + [{"train.epochs": 4, "head.margin": 0.5}]:
        study.enqueue_trial(params)
    study = tune(CONFIG, space, 4, overrides=tmp_path_overrides(tmp_path), out_path=tmp_path / "best.yaml")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert study.trials[0].intermediate_values == {500: 0.15, 1000: 0.3}
    assert study.trials[3].intermediate_values == {250: 0.125, 500: 0.25, 750: 0.375, 1000: 0.5}
    assert study.best_trial.number == 3 and load_config(tmp_path / "best.yaml").train.epochs == 4


def test_the_best_config_is_an_experiment_of_its_own(tmp_path, monkeypatch, fake_training):
    """The space file is usually named after the config (configs/tune/glyphs_arcface.yaml), so the study is too: its
    best config must not be named like the config's own experiment, whose finished folds it would collide with."""
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "glyphs_arcface.yaml"
    space.write_text(MARGINS)
    overrides = [*tmp_path_overrides(tmp_path), "train.epochs=1"]
    tune(CONFIG, space, 1, overrides=overrides)
    written = tmp_path / "configs" / "tuned" / "glyphs_arcface_best.yaml"
    assert [p.name for p in (tmp_path / "configs" / "tuned").iterdir()] == [written.name]
    assert yaml.safe_load(written.read_text())["name"] == "glyphs_arcface_best"
    assert load_config(written).name == "glyphs_arcface_best" != load_config(CONFIG).name
    with pytest.raises(ConfigError, match="would name its best config 'x_best', the experiment of"):
        tune(CONFIG, space, 1, study_name="x", overrides=[*overrides, "name=x_best"])


def test_interrupted_trial_is_queued_again_and_resumes_its_training(tmp_path, monkeypatch):
    fake = FakeTraining(interrupt_on_call=2)
    monkeypatch.setattr(arcfold.training.tune, "train_fold", fake)
    overrides = [*tmp_path_overrides(tmp_path), "train.epochs=1"]
    space = _space(tmp_path, MARGINS)
    with pytest.raises(KeyboardInterrupt):
        tune(CONFIG, space, 3, overrides=overrides, out_path=tmp_path / "best.yaml")
    study = _load(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    interrupted = study.trials[1]

    tune(CONFIG, space, 3, overrides=overrides, out_path=tmp_path / "best.yaml")
    study = _load(tmp_path)
    assert len(study.get_trials(states=FINISHED)) == 3
    retry = study.trials[2]
    assert retry.params == interrupted.params and retry.user_attrs["experiment"] == "space_t1"
    assert fake.calls[2] == ("space_t1", interrupted.params["head.margin"], True)  # same run, train.resume=true
    assert fake.calls[3][0] == "space_t3" and fake.calls[3][2] is False
    tune(CONFIG, space, 3, overrides=overrides, out_path=tmp_path / "best.yaml")  # nothing left to do or requeue
    assert len(_load(tmp_path).trials) == 4


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage")
def test_killed_trial_is_retried_once_its_heartbeat_is_stale(tmp_path, fake_training):
    overrides = [*tmp_path_overrides(tmp_path), "train.epochs=1"]
    space = _space(tmp_path, MARGINS)
    tune(CONFIG, space, 1, overrides=overrides, out_path=tmp_path / "best.yaml", grace_period=1)
    # a process that died mid-trial leaves a RUNNING trial whose heartbeat stops
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'oof' / 'tune' / 'space.db'}", heartbeat_interval=1, grace_period=1
    )
    study = optuna.load_study(study_name="space", storage=storage)
    zombie = study.ask({"head.margin": optuna.distributions.CategoricalDistribution([0.1, 0.2, 0.3, 0.4, 0.5])})
    zombie.set_user_attr("experiment", f"space_t{zombie.number}")
    storage.record_heartbeat(zombie._trial_id)
    time.sleep(2.5)

    tune(CONFIG, space, 2, overrides=overrides, out_path=tmp_path / "best.yaml", grace_period=1)
    trials = _load(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["experiment"] == "space_t1"
    assert fake_training.calls[-1] == ("space_t1", trials[1].params["head.margin"], True)
