"""Tune stage: an optuna search over any config keys, each trial a real training run on chosen folds.

Search space, a YAML mapping of config keys (``configs/tune/*.yaml``)::

    optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    head.margin: {type: float, low: 0.2, high: 0.5, step: 0.05}
    model.embedding_size: {type: categorical, choices: [128, 256, 512]}
    train.epochs: {type: int, low: 4, high: 12, step: 2}

``type`` is ``float`` / ``int`` (``low``, ``high``, optional ``log`` or ``step``) or ``categorical``
(``choices``: numbers, strings, booleans or null). Every key must be a config key; a misspelt one
is an error before anything trains.

Each trial is an experiment named ``<study>_t<number>`` (so it has its own ``oof/`` and ``models/``
folders and shows on the leaderboard), trained with :func:`arcfold.training.fold.train_fold` on every fold
of ``--folds`` with the config + command-line overrides + the trial's values. The objective is the
mean of ``--metric`` (``recall@1``, ``map@r``, ...; the scores of the epoch each fold kept, ``train.keep``)
over those folds, maximised with optuna's TPE sampler.

Pruning: after every validated epoch the trial reports that epoch's ``--metric`` and optuna's MedianPruner
stops trials whose best report so far is below the median of earlier trials at the same step (after 3
finished trials, and never at a trial's first epoch). The step is the position in the schedule, not the epoch
index: ``i * 1000 + round(1000 * (epoch + 1) / train.epochs)`` for the i-th fold of ``--folds`` (per mille of
that fold's schedule; :func:`schedule_step`). When ``train.epochs`` is searched, trials of different lengths are
so compared at the same fraction of their schedule (e.g. step 500: epoch 1 of 2 and epoch 3 of 6), never a
short run's end against a long run's start; steps one trial reaches and another does not (250 of a 4-epoch
run, say) prune only against trials that reached them. The per-epoch report is ``train_fold``'s
``on_epoch_end`` callback; ``--no-prune`` turns it off. A pruned trial's checkpoints are deleted; its history
stays.

Persistence: the study lives in ``<paths.oof_dir>/tune/<study>.db`` (SQLite). Running the same
command again resumes it: ``--trials N`` is the number of finished (complete or pruned) trials the
study should have, so only the missing ones run. A trial stopped by Ctrl-C is queued again with the
same values and continues its training (``train.resume``); so is one whose process was killed,
once its heartbeat is older than ``--grace-period`` seconds. A study refuses to resume with another
metric, other folds or another space.

The best trial is written, after every trial, as a config that extends the original one
(``configs/tuned/<study>_best.yaml`` by default): ``base:`` the original config, then the command-line
overrides and the trial's values, and ``name: <study>_best``, an experiment of its own (never the original
config's: training it would be refused as finished, or with ``train.force=true`` overwrite the original);
``python -m arcfold train -c configs/tuned/<study>_best.yaml`` repeats it on every fold.

CLI::

    python -m arcfold tune --config configs/glyphs_arcface.yaml --space configs/tune/glyphs_arcface.yaml \\
        --trials 20 --folds 0 [--metric recall@1] [--study NAME] [key=value ...]

The study is named after the space file unless ``--study`` says otherwise (``glyphs_arcface`` here), so its trials
are ``glyphs_arcface_t0``, ``glyphs_arcface_t1``, ...: ``python -m arcfold leaderboard --exclude
'glyphs_arcface_t[0-9]*'`` hides them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from omegaconf import OmegaConf
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from arcfold.config import load_config
from arcfold.errors import ConfigError
from arcfold.io import save_text
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

log = logging.getLogger(__name__)

__all__ = ["best_experiment_name", "load_space", "schedule_step", "suggest", "tune", "write_best_config"]

_TYPES = ("float", "int", "categorical")
_SPEC_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}
DEFAULT_GRACE_PERIOD = 300  # seconds without a heartbeat before a running trial counts as killed
STEPS_PER_FOLD = 1000  # pruning steps per fold: per mille of the fold's schedule


# --------------------------------------------------------------------------------------------
# search space


def load_space(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read and check a search space file; all problems are reported together."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        space = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: a search space is a non-empty mapping of config keys to {{type: ...}}")
    problems = []
    for key, spec in space.items():
        if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
            problems.append(f"{key}: needs type: {' | '.join(_TYPES)}")
            continue
        kind = spec["type"]
        unknown = set(spec) - _SPEC_KEYS[kind] - {"type"}
        if unknown:
            problems.append(f"{key}: unknown field(s) {', '.join(sorted(unknown))} for type {kind}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                problems.append(f"{key}: categorical needs a non-empty list of choices")
            elif not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                problems.append(f"{key}: choices must be numbers, strings, booleans or null")
            continue
        low, high = spec.get("low"), spec.get("high")
        number = int if kind == "int" else (int, float)
        if not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool):
            problems.append(f"{key}: {kind} needs numeric low and high")
        elif not low < high:
            problems.append(f"{key}: low must be < high (got {low}, {high})")
        elif spec.get("log") and low <= 0:
            problems.append(f"{key}: log scale needs low > 0")
        if spec.get("log") and spec.get("step") is not None and kind == "float":
            problems.append(f"{key}: log and step cannot be combined")
    if problems:
        raise ConfigError(f"{path}: invalid search space:\n  " + "\n  ".join(problems))
    return space


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The trial's value of every key of the space."""
    values = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            values[key] = trial.suggest_float(
                key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")), step=spec.get("step")
            )
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(
                key, spec["low"], spec["high"], log=bool(spec.get("log")), step=spec.get("step") or 1
            )
        else:
            values[key] = trial.suggest_categorical(key, spec["choices"])
    return values


def _clean(value: Any) -> Any:
    """12 significant digits: a stepped float such as 0.30000000000000004 is written 0.3."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def _overrides(values: dict[str, Any]) -> list[str]:
    # JSON scalars are YAML scalars: strings stay strings ("1e-3" too), None becomes null
    return [f"{key}={json.dumps(_clean(value))}" for key, value in values.items()]


def _sample_point(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {k: (s["choices"][0] if s["type"] == "categorical" else s["low"]) for k, s in space.items()}


# --------------------------------------------------------------------------------------------
# the objective


def schedule_step(fold_index: int, epoch: int, epochs: int) -> int:
    """The pruning step of ``epoch`` (0-based) of a ``epochs``-epoch run on the ``fold_index``-th fold of a trial:
    per mille of the schedule done, so trials of different ``train.epochs`` meet at the same fraction of it.

    >>> schedule_step(0, 1, 2), schedule_step(0, 3, 8), schedule_step(1, 0, 4)
    (1000, 500, 1250)
    """
    return fold_index * STEPS_PER_FOLD + round(STEPS_PER_FOLD * (epoch + 1) / epochs)


def _epoch_reporter(trial, metric: str, fold_index: int, epochs: int, prune: bool) -> Callable[[dict[str, Any]], None]:
    """``train_fold``'s ``on_epoch_end``: report each validated epoch's ``metric`` to optuna at its
    :func:`schedule_step` and prune there (not at the trial's first epoch)."""

    def report(row: dict[str, Any]) -> None:
        value = float(row[metric])
        epoch = int(row["epoch"])
        trial.report(value, step=schedule_step(fold_index, epoch, epochs))
        if prune and (fold_index, epoch) != (0, 0) and trial.should_prune():
            raise optuna.TrialPruned(
                f"epoch {row['epoch']}: {metric} {value:.4f} is below the median of earlier trials"
            )

    return report


def _make_objective(
    config: str, overrides: Sequence[str], space: dict, folds: Sequence[int], metric: str, study_name: str, prune: bool
):

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, space)
        # a retried trial (interrupted, or killed and found stale) inherits its experiment name and resumes it
        experiment = trial.user_attrs.get("experiment")
        resume = experiment is not None
        if experiment is None:
            experiment = f"{study_name}_t{trial.number}"
            trial.set_user_attr("experiment", experiment)
        cfg = load_config(
            config, [*overrides, *_overrides(values), f"name={experiment}", *(["train.resume=true"] if resume else [])]
        )
        log.info("trial %d (%s): %s", trial.number, experiment, " ".join(_overrides(values)))
        scores = []
        try:
            for i, fold in enumerate(folds):
                try:
                    reporter = _epoch_reporter(trial, metric, i, cfg.train.epochs, prune)
                    result = train_fold(cfg, fold, on_epoch_end=reporter)
                except optuna.TrialPruned:
                    work = FoldPaths(cfg, fold).work
                    for p in [*work.glob("*.pt"), *work.glob("*.npz")]:  # keep history.csv and train.log
                        p.unlink()
                    raise
                scores.append(float(result[metric]))
                trial.set_user_attr(f"fold{fold}", scores[-1])
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        return float(sum(scores) / len(scores))

    return objective


# --------------------------------------------------------------------------------------------
# best config


def best_experiment_name(study_name: str) -> str:
    """The experiment name of a study's best config: ``<study>_best`` (the trials are ``<study>_t<N>``)."""
    return f"{study_name}_best"


def write_best_config(study, config: str, overrides: Sequence[str], out_path: str | os.PathLike) -> Path | None:
    """Write the best finished trial as a config extending ``config``, named :func:`best_experiment_name`;
    None while no trial has finished."""

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    best = study.best_trial
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mapping = OmegaConf.create({"base": os.path.relpath(Path(config).resolve(), out_path.parent.resolve())})
    mapping = OmegaConf.merge(mapping, OmegaConf.from_dotlist([o for o in overrides if not o.startswith("name=")]))
    for key, value in best.params.items():  # dotted keys, typed values
        OmegaConf.update(mapping, key, _clean(value))
    mapping["name"] = best_experiment_name(study.study_name)
    attrs = study.user_attrs
    header = (
        f"# Best trial of optuna study '{study.study_name}' ({attrs.get('storage', '')}): trial {best.number} "
        f"(experiment {best.user_attrs.get('experiment')}), mean {attrs.get('metric')} = {best.value:.4f} "
        f"on fold(s) {' '.join(map(str, attrs.get('folds', [])))}; {len(done)} complete trials.\n"
        "# Written by `python -m arcfold tune`; rerun the study to update it.\n"
    )
    text = header + yaml.safe_dump(OmegaConf.to_container(mapping), sort_keys=False)
    save_text(out_path, text)
    load_config(out_path)  # the file must load, with the same checks as any config
    return out_path


# --------------------------------------------------------------------------------------------
# the study


def default_best_config_path(study_name: str) -> Path:
    """``configs/tuned/<study>_best.yaml``: where ``tune`` writes the best config unless ``--out`` says otherwise."""
    return Path("configs") / "tuned" / f"{best_experiment_name(study_name)}.yaml"


def _open_study(storage_path: Path, study_name: str, grace_period: int, prune: bool, seed: int):

    storage_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            f"sqlite:///{storage_path.resolve()}",
            heartbeat_interval=max(1, min(60, grace_period // 3)),
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    existing = optuna.get_all_study_names(storage) if storage_path.exists() else []
    n_before = len(optuna.load_study(study_name=study_name, storage=storage).trials) if study_name in existing else 0
    # steps are schedule fractions (schedule_step); the first epoch is spared by the reporter, not by warm-up steps
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()
    # the sampler's seed moves on with the study, so a resumed study does not replay its first random trials
    sampler = optuna.samplers.TPESampler(seed=seed + n_before)
    return optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def _check_or_set(study, expected: dict[str, Any]) -> None:
    attrs = study.user_attrs
    if not attrs:
        for key, value in expected.items():
            study.set_user_attr(key, value)
        return
    differ = [key for key in ("metric", "folds", "space") if attrs.get(key) != expected[key]]
    if differ:
        detail = "; ".join(f"{k}: study has {attrs.get(k)!r}, asked {expected[k]!r}" for k in differ)
        raise ConfigError(
            f"study '{study.study_name}' was made with another {', '.join(differ)} ({detail}); use another --study name"
        )


def _requeue_interrupted(study) -> int:
    """Queue again, with the same values and experiment, trials stopped by Ctrl-C (state FAIL, 'interrupted')."""

    done = set(study.user_attrs.get("requeued", []))
    requeued = []
    for t in study.trials:
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in done:
            attrs = {k: v for k, v in t.user_attrs.items() if k != "interrupted"}
            study.enqueue_trial(t.params, user_attrs=attrs)
            requeued.append(t.number)
    if requeued:
        study.set_user_attr("requeued", sorted(done | set(requeued)))
        log.info("queued interrupted trial(s) %s again, to resume their training", requeued)
    return len(requeued)


def tune(
    config: str | os.PathLike,
    space_path: str | os.PathLike,
    n_trials: int,
    folds: Sequence[int] = (0,),
    metric: str = "recall@1",
    study_name: str | None = None,
    overrides: Sequence[str] = (),
    prune: bool = True,
    out_path: str | os.PathLike | None = None,
    grace_period: int = DEFAULT_GRACE_PERIOD,
    seed: int = 0,
):
    """Run (or resume) a study until it has ``n_trials`` finished trials; return the optuna study."""

    config = str(config)
    space = load_space(space_path)
    study_name = study_name or Path(space_path).stem
    if not metric.startswith(("recall@", "map@")):
        raise ConfigError(f"--metric must be a retrieval metric such as recall@1 or map@r, got {metric!r}")
    folds = [int(f) for f in folds]
    base_cfg = load_config(config, list(overrides))
    load_config(config, [*overrides, *_overrides(_sample_point(space))])  # every key of the space exists
    if max(folds) >= base_cfg.folds.n_splits:
        raise ConfigError(f"--folds {folds}: the config has folds.n_splits={base_cfg.folds.n_splits}")
    if best_experiment_name(study_name) == base_cfg.name:
        raise ConfigError(
            f"study '{study_name}' would name its best config '{base_cfg.name}', the experiment of {config} itself; "
            "use another --study name"
        )
    storage_path = Path(base_cfg.paths.oof_dir) / "tune" / f"{study_name}.db"
    out_path = Path(out_path) if out_path is not None else default_best_config_path(study_name)

    study = _open_study(storage_path, study_name, grace_period, prune, seed)
    _check_or_set(
        study,
        {"metric": metric, "folds": folds, "space": space, "config": config, "storage": str(storage_path)},
    )
    _requeue_interrupted(study)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    n_done = len(study.get_trials(deepcopy=False, states=finished))
    remaining = max(0, n_trials - n_done)
    log.info("study '%s' (%s): %d finished trial(s), running %d more", study_name, storage_path, n_done, remaining)

    def write_best(study, trial) -> None:
        path = write_best_config(study, config, overrides, out_path)
        if path is not None and study.best_trial.number == trial.number:
            log.info("new best trial %d: %s = %.4f -> %s", trial.number, metric, trial.value, path)

    objective = _make_objective(config, list(overrides), space, folds, metric, study_name, prune)
    if remaining:
        # a diverging run (non-finite losses) fails its trial, not the study
        study.optimize(objective, n_trials=remaining, catch=(FloatingPointError,), callbacks=[write_best])
    write_best_config(study, config, overrides, out_path)
    return study


def render_study(study) -> str:

    rows = []
    for t in study.trials:
        value = "-" if t.value is None or math.isnan(t.value) else f"{t.value:.4f}"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        rows.append(f"  {t.number:>4}  {t.state.name:<8}  {value:>7}  {params}")
    lines = [f"study '{study.study_name}': {len(study.trials)} trial(s)", *rows]
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        best = study.best_trial
        lines.append(f"best: trial {best.number} ({best.user_attrs.get('experiment')}) = {best.value:.4f}")
    return "\n".join(lines)
