"""Test stage: the held-out test split (fold -1 of the fold file) embedded by every finished fold model, and scored.

The "seed protocol" of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020): ``folds.test_fraction`` or
``folds.test_groups`` hold whole groups out of every fold (:mod:`arcfold.folds`), so no choice made on OOF scores
(epochs, blend weights, re-ranking, tuning) has seen them. Nothing but this stage reads those rows: training drops
them, OOF files never contain them, and blend, rerank, tune and holdout read OOF files only.

For an experiment, the test rows of the fold file its folds were trained from (``folds_path`` of the fold JSONs,
verified, with the same sha256) are embedded with each finished fold model ``models/<exp>/fold<K>.pt`` through
the preprocessing of OOF validation (``ImageDataset`` + ``build_eval_transform`` at the model's image size and
``data.cache_images``, :func:`arcfold.inference.embed.extract_embeddings` with the model's AMP and batch size), and
scored by leave-one-out Recall@K / MAP@R (:func:`arcfold.retrieval.metrics.retrieval_metrics`, ``DEFAULT_KS``) three
ways:

* ``separate``: each fold model alone; per fold, and mean ± std (``ddof=0``) over the folds (over the members
  given, ``full`` included, with ``--folds``);
* ``concatenated``: the fold ensemble inference submits, ``blend_embeddings(per_fold, [1] * K)``: each fold's
  L2-normalised embedding times ``1/sqrt(K)``, concatenated, so a cosine is the mean of the folds' cosines;
* ``mean_of_folds``: ``l2(mean of the folds' embeddings)``, the old inference fold ensemble, kept only for
  comparison: fold models do not share a basis, so averaging their vectors mixes unaligned spaces.

Writes ``oof/<exp>/test.json`` (those numbers, the folds used, ``n_images`` / ``n_classes`` / ``n_queries``, the
fold file and its sha256, the test groups, the date) and ``oof/<exp>/test.npz`` (``ids``, ``images``, ``labels``,
``groups``, and one ``fold<K>`` embedding array ``(N, D)`` per fold model, rows in fold-file order), atomically;
existing ones are kept unless ``--force``.

The full-data fit (``models/<exp>/full.pt``, ``bash train_fold.sh full``) is a member when asked for:
``--folds full`` scores it alone, ``--folds 0..4,full`` with the folds (its own row ``full`` in ``separate``, its
own ``full`` array in ``test.npz``, and a part of ``concatenated``). Without ``--folds`` the members are the
finished folds, the fold ensemble inference submits by default.

For a blend spec (``--blend oof/blends/B.json``), each member experiment's folds (the spec's) are concatenated as
above, then the members are combined with the spec's weights (:func:`arcfold.retrieval.ensemble.blend_embeddings`);
written to ``oof/blends/B.test.json`` beside the spec: ``concatenated`` (the blend), ``mean_of_folds`` (members
averaged over folds, then blended: the old inference) and ``members`` (each member's three scores).

CLI::

    python -m arcfold test -c CONFIG [key=value ...]            # or: --experiment NAME, or --blend oof/blends/B.json
    python -m arcfold test -c CONFIG --folds 0..4,full --force  # the folds and the full-data fit
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from arcfold.artifacts import FULL_FIT, finished_folds, fold_name
from arcfold.config import DataConfig
from arcfold.data.dataset import ImageDataset
from arcfold.data.folds import load_test_rows
from arcfold.data.table import GROUP, ID, IMAGE, LABEL, check_image_files, image_root, resolve_image_paths
from arcfold.data.transforms import build_eval_transform
from arcfold.errors import ArtifactExistsError, DataValidationError
from arcfold.inference.embed import extract_embeddings
from arcfold.io import save_json, save_npz
from arcfold.models.embedding import load_embedding_model
from arcfold.retrieval.ensemble import blend_embeddings, load_blend_spec
from arcfold.retrieval.metrics import DEFAULT_KS, retrieval_metrics
from arcfold.runtime import amp_dtype_for, resolve_device

log = logging.getLogger(__name__)

__all__ = ["TEST_FORMAT", "evaluate_blend", "evaluate_experiment", "score_test_embeddings"]

TEST_FORMAT = "arcfold.test/1"
METRICS = [f"recall@{k}" for k in DEFAULT_KS] + ["map@r"]
MEAN_OF_FOLDS_NOTE = (
    "l2(mean of the fold models' embeddings): the old inference fold ensemble, for comparison only (fold models do "
    "not share a basis); inference submits 'concatenated'"
)


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _metrics(embeddings: np.ndarray, labels: np.ndarray, device: torch.device | str | None) -> dict[str, float]:
    scores = retrieval_metrics(embeddings, labels, ks=DEFAULT_KS, device=device)
    return {k: float(scores[k]) for k in METRICS}


def score_test_embeddings(
    per_fold: Mapping[int | str, np.ndarray], labels: np.ndarray, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Leave-one-out scores of the test rows, embedded by each fold model (``per_fold[K]``: (N, D_K); K may be
    ``"full"``, the full-data fit, a member like the folds).

    Returns ``{"separate": {"per_fold": {"K": metrics}, "mean": .., "std": ..}, "concatenated": metrics,
    "mean_of_folds": metrics}`` (metrics: Recall@K for ``DEFAULT_KS`` and MAP@R).
    """
    folds = list(per_fold)
    separate = {str(k): _metrics(per_fold[k], labels, device) for k in folds}
    table = pd.DataFrame.from_dict(separate, orient="index")[METRICS]
    concatenated = blend_embeddings([per_fold[k] for k in folds], [1.0] * len(folds))  # (N, sum D_K)
    mean_of_folds = _l2(np.mean([_l2(per_fold[k]) for k in folds], axis=0))  # needs equal D: old inference only
    return {
        "separate": {
            "per_fold": separate,
            "mean": table.mean().to_dict(),
            "std": table.std(ddof=0).to_dict(),
        },
        "concatenated": _metrics(concatenated, labels, device),
        "mean_of_folds": _metrics(mean_of_folds, labels, device),
    }


# --------------------------------------------------------------------------------------------
# the test rows of an experiment, and their embeddings


def _eval_dataset(test_df: pd.DataFrame, data_cfg: DataConfig, size: int, progress: bool) -> ImageDataset:
    """The rows as OOF validation reads them (``_train_fold``'s ``val_ds``): eval transform at ``size``."""
    cache = data_cfg.cache_images
    return ImageDataset(
        resolve_image_paths(test_df, image_root(data_cfg)),
        None,
        build_eval_transform(size),
        cache=cache,
        size=size,  # read_image resizes, cached or not: the resize of training, OOF and inference
        progress=progress,
    )


def embed_test_rows(
    models_dir: str | Path,
    folds: Sequence[int | str],
    test_df: pd.DataFrame,
    device: torch.device,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
) -> dict[int | str, np.ndarray]:
    """``{K: (N, D) L2-normalised embeddings of the rows by models_dir/fold<K>.pt}`` (``models_dir/full.pt`` for
    ``K = "full"``).

    Images are found under ``data_cfg`` (default: the first checkpoint's config), each model reads them at its
    own ``data.image_size`` with its ``train.amp`` (on ``device``), ``train.eval_batch_size`` and
    ``data.num_workers``.
    """
    models_dir = Path(models_dir)
    paths = {k: models_dir / f"{fold_name(k)}.pt" for k in folds}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"finished folds without their model: {', '.join(missing)} (retrain with train.force)")
    datasets: dict[int, ImageDataset] = {}
    per_fold = {}
    for k in folds:
        model, model_cfg, _ = load_embedding_model(paths[k], device)
        if not datasets:  # the first model: check the files are there before any decoding
            data_cfg = data_cfg or model_cfg.data
            check_image_files(test_df, image_root(data_cfg), mode="exists", source="test split", progress=progress)
        assert data_cfg is not None
        size = model_cfg.data.image_size
        if size not in datasets:
            datasets[size] = _eval_dataset(test_df, data_cfg, size, progress)
        per_fold[k] = extract_embeddings(
            model,
            datasets[size],
            batch_size=model_cfg.train.eval_batch_size,
            device=device,
            amp_dtype=amp_dtype_for(model_cfg.train.amp, device),
            num_workers=model_cfg.data.num_workers,
            channels_last=model_cfg.train.channels_last,
            progress=progress,
            desc=f"{models_dir.name} {fold_name(k)} test",
        )  # (N, D)
        del model
    return per_fold


def _experiment_folds(
    oof_dir: Path, experiment: str, folds: Sequence[int | str] | None = None, models_dir: Path | None = None
) -> list[int | str]:
    """The finished folds (``folds=None``), or ``folds`` checked finished: sorted, the full fit (finished when
    ``models_dir/<experiment>/full.json`` is there) last."""
    exp_dir = oof_dir / experiment
    finished = finished_folds(exp_dir) if exp_dir.is_dir() else []
    if folds is None:
        if not finished:
            raise FileNotFoundError(f"experiment '{experiment}' has no finished fold in {exp_dir} (train it first)")
        return list(finished)
    numbers = sorted(int(k) for k in set(folds) if k != FULL_FIT)
    missing = [k for k in numbers if k not in finished]
    if missing:
        raise FileNotFoundError(f"fold {', '.join(map(str, missing))} of experiment '{experiment}' is not finished")
    if FULL_FIT not in folds:
        return list(numbers)
    full_json = Path(models_dir or "models") / experiment / "full.json"
    if not full_json.is_file():
        raise FileNotFoundError(
            f"the full fit of experiment '{experiment}' is not finished ({full_json} is missing): train it with "
            "`bash train_fold.sh full CONFIG`"
        )
    return [*numbers, FULL_FIT]


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ArtifactExistsError(f"{' and '.join(existing)} already written; --force scores the test split again")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _header(test_df: pd.DataFrame, info: dict[str, Any], folds: Sequence[int | str]) -> dict[str, Any]:
    labels = test_df[LABEL].to_numpy()
    class_size = pd.Series(labels).map(pd.Series(labels).value_counts())
    return {
        "format": TEST_FORMAT,
        "folds": [k if k == FULL_FIT else int(k) for k in folds],
        "n_images": len(test_df),
        "n_classes": int(test_df[LABEL].nunique()),
        "n_queries": int((class_size >= 2).sum()),
        "test_groups": info["test"]["groups"],
        "folds_path": info["folds_path"],
        "folds_sha256": info["folds_sha256"],
        "created_at": _now(),
    }


def evaluate_experiment(
    experiment: str,
    oof_dir: str | Path = "oof",
    models_dir: str | Path = "models",
    device: str | torch.device = "auto",
    data_cfg: DataConfig | None = None,
    force: bool = False,
    progress: bool = True,
    folds: Sequence[int | str] | None = None,
) -> dict[str, Any]:
    """Embed and score the test split with every finished fold of ``experiment`` (or ``folds``, ``"full"`` the
    full-data fit); write test.json / test.npz."""
    oof_dir, models_dir = Path(oof_dir), Path(models_dir)
    out_json, out_npz = oof_dir / experiment / "test.json", oof_dir / experiment / "test.npz"
    _refuse_overwrite([out_json, out_npz], force)
    folds = _experiment_folds(oof_dir, experiment, folds, models_dir)
    full_json = {FULL_FIT: models_dir / experiment / "full.json"}  # the full fit's record: the fold file it used
    test_df, info = load_test_rows(oof_dir / experiment, folds, full_json)
    device = resolve_device(str(device), key="--device") if not isinstance(device, torch.device) else device
    per_fold = embed_test_rows(models_dir / experiment, folds, test_df, device, data_cfg, progress)
    result = {
        **_header(test_df, info, folds),
        "experiment": experiment,
        **score_test_embeddings(per_fold, test_df[LABEL].to_numpy(), device),
        "mean_of_folds_note": MEAN_OF_FOLDS_NOTE,
    }
    save_npz(
        out_npz,
        ids=test_df[ID].to_numpy(dtype=str),
        images=test_df[IMAGE].to_numpy(dtype=str),
        labels=test_df[LABEL].to_numpy(dtype=str),
        groups=test_df[GROUP].to_numpy(dtype=str),
        **{fold_name(k): per_fold[k].astype(np.float32) for k in folds},  # fold<K>, full
    )
    save_json(out_json, result)  # last: the JSON marks the stage done
    return result


def evaluate_blend(
    spec_path: str | Path,
    oof_dir: str | Path = "oof",
    models_dir: str | Path = "models",
    device: str | torch.device = "auto",
    data_cfg: DataConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The test split scored for a blend spec: each member's folds concatenated, members blended by the spec's
    weights; written to ``<spec>.test.json`` beside the spec."""
    spec_path, oof_dir = Path(spec_path), Path(oof_dir)
    out_json = spec_path.with_suffix(".test.json")
    _refuse_overwrite([out_json], force)
    spec = load_blend_spec(spec_path)
    device = resolve_device(str(device), key="--device") if not isinstance(device, torch.device) else device
    members: dict[str, dict[int, np.ndarray]] = {}
    test_df, info = None, None
    for exp in spec["experiments"]:
        folds = _experiment_folds(oof_dir, exp, spec["folds"])
        rows, exp_info = load_test_rows(oof_dir / exp, folds)
        if info is not None and exp_info["folds_sha256"] != info["folds_sha256"]:
            raise DataValidationError(f"{spec_path}: member '{exp}' was trained on another fold file than the others")
        test_df, info = rows, exp_info
        members[exp] = embed_test_rows(Path(models_dir) / exp, folds, rows, device, data_cfg, progress)
    assert test_df is not None and info is not None
    labels = test_df[LABEL].to_numpy()
    folds = sorted(spec["folds"])
    concatenated = [blend_embeddings([m[k] for k in folds], [1.0] * len(folds)) for m in members.values()]
    averaged = [_l2(np.mean([_l2(m[k]) for k in folds], axis=0)) for m in members.values()]
    result = {
        **_header(test_df, info, folds),
        "blend": spec["name"],
        "experiments": list(spec["experiments"]),
        "weights": list(spec["weights"]),
        "concatenated": _metrics(blend_embeddings(concatenated, spec["weights"]), labels, device),
        "mean_of_folds": _metrics(blend_embeddings(averaged, spec["weights"]), labels, device),
        "mean_of_folds_note": MEAN_OF_FOLDS_NOTE,
        "members": {exp: score_test_embeddings(m, labels, device) for exp, m in members.items()},
    }
    save_json(out_json, result)
    return result


# --------------------------------------------------------------------------------------------
# CLI


def render_test(result: dict[str, Any]) -> str:
    """The scores as a table: per fold, separate mean/std, concatenated, mean of folds."""
    rows: dict[str, dict[str, float]] = {}

    def add(prefix: str, scores: dict[str, Any]) -> None:
        for k, m in scores["separate"]["per_fold"].items():
            rows[f"{prefix}{'full fit' if k == FULL_FIT else f'fold {k}'}"] = m
        rows[f"{prefix}separate mean"] = scores["separate"]["mean"]
        rows[f"{prefix}separate std"] = scores["separate"]["std"]

    blend = "blend" in result
    if blend:
        for exp, scores in result["members"].items():
            add(f"{exp} ", scores)
            rows[f"{exp} concatenated"] = scores["concatenated"]
    else:
        add("", result)
    rows["concatenated" + (", members blended" if blend else "")] = result["concatenated"]
    rows["mean of folds (old inference, comparison only)"] = result["mean_of_folds"]
    table = pd.DataFrame.from_dict(rows, orient="index")[METRICS]
    name = f"blend '{result['blend']}'" if blend else result["experiment"]
    head = (
        f"{name}: test split of {result['folds_path']} ({result['n_images']} images, {result['n_classes']} classes, "
        f"{result['n_queries']} queries; groups {', '.join(result['test_groups'])}), folds "
        f"{', '.join(map(str, result['folds']))}, leave-one-out"
    )
    return head + "\n" + table.to_string(float_format=lambda v: f"{v:.4f}")
