"""Inference stage: embed query and gallery images with fold/experiment ensembles, search, re-rank, write a submission.

Made for an internet-less Kaggle notebook: weights come only from ``models_dir`` (which may be read-only; nothing
is ever written there), nothing is downloaded, and ``inference.py`` at the repository root puts ``src/`` on
``sys.path`` so no install step is needed. faiss is optional (exact torch search otherwise).

What it does, in order (timings of each stage are logged at the end):

1. **Models.** ``experiment: NAME`` uses every ``<models_dir>/NAME/fold<K>.pt`` of the experiment's
   ``folds.n_splits`` folds (a missing fold is an error naming it, unless ``allow_missing_folds=true`` or
   ``folds=[...]`` picks some; ``full`` in the list is the full-data fit ``full.pt``: ``folds=[full]`` alone,
   ``folds=[0,1,2,full]`` beside the folds, one more member of the concatenation); ``blend: PATH`` uses a blend
   spec (``python -m arcfold blend``) and all of its member experiments. Checkpoints are loaded with
   ``torch.load(weights_only=True)``: no code runs from them.
2. **Embedding.** Every image is decoded once per pass and resized by :func:`arcfold.data.dataset.resize_image`
   (as in training) to each size the models need: ``image_size × scale`` for each ``tta.scales``; ``tta.hflip`` adds
   the mirrored view. A model's embedding of an image is the mean of its views' L2-normalised embeddings,
   normalised. An experiment's K fold models are combined like a blend of K equal members
   (:func:`arcfold.retrieval.ensemble.blend_embeddings` with weights ``[1] * K``): each fold's embedding times
   ``1/sqrt(K)``, concatenated (K × D dims), so the similarity of two images is the mean of the folds' cosines.
   (Averaging the vectors instead would add up unrelated coordinates: every fold model has its own basis.)
   ``fold_pca=true`` reduces each experiment's concatenation back to ``fold_pca_dim`` dims (default: one fold's D) with
   an uncentred PCA (scikit-learn's ``TruncatedSVD``) fitted on the gallery and applied to query and gallery alike,
   then L2-normalised: search memory and time of one model for a little accuracy (an uncentred projection keeps
   the cosine scale the vote threshold was chosen on; it is exact when the folds' embeddings span only D dims).
   A blend concatenates its experiments with ``sqrt(weight)``. With one fold model, no TTA and scale 1 the
   embeddings equal the OOF ones the train stage wrote for the same images.
3. **Search + re-ranking.** :func:`arcfold.retrieval.postprocess.rerank_pipeline` with the steps of a rerank spec
   (``python -m arcfold rerank``; ``rerank: auto`` takes the spec of the submission's task, ``retrieval`` or
   ``recognition`` (for both recognition and top5): ``<oof_dir>/<experiment>/rerank-<task>.json``, then the same
   name under ``<models_dir>/<experiment>/``, or ``<blend>.rerank-<task>.json`` beside a blend spec; ``none``
   turns it off; a path names one) and the search settings of ``search`` (exact / IVF / HNSW, faiss GPU when
   present, chunked; the knob of an IVF / HNSW index is chosen on the gallery for ``search.target_recall``, unless
   ``search.nprobe`` / ``search.ef_search`` is set: one log line per index built, and the records in the returned
   summary's ``search.indexes``, see :mod:`arcfold.retrieval.index_tuning`). ``recognition`` and ``top5`` need the
   recognition spec's vote (its ``new_label`` threshold was chosen on OOF): without one, ``rerank: auto`` is an
   error naming the command that makes it
   (``python -m arcfold rerank --experiment NAME --task recognition``), and so is a spec of the retrieval task;
   ``rerank: none`` votes with the config's ``vote`` instead (a warning for top5 when ``vote.threshold`` is null:
   the new label is then never predicted).
4. **Submission.** ``submission.format`` (see :mod:`arcfold.submission`): ``retrieval`` writes the top
   ``submission.top_k`` gallery ids; ``recognition`` and ``top5`` vote over the neighbours' gallery labels
   (``gallery.label_column`` required) with the rerank spec's vote settings (else ``vote``), ``top5`` inserting
   ``submission.new_label`` below the threshold. ``top5`` always lists 5 distinct labels (fewer only if the
   gallery has fewer): the search returns ``max(vote.k, 50)`` neighbours and the slots the vote leaves empty are
   filled, after the vote's own labels and the new label, by the labels of the further neighbours in vote order
   (:func:`arcfold.retrieval.voting.vote_labels` with ``fill``); rows still short are searched again 4× deeper. The
   file is validated before it is written (atomically) to ``<out_dir>/<name>.csv``; with ``save_embeddings=true``
   the embeddings go to ``<out_dir>/<name>.npz``.

Config: :class:`InferenceConfig` (YAML file with ``base:`` chains and ``key=value`` overrides, unknown keys are
errors, as for training). Example::

    python inference.py -c configs/inference/glyphs.yaml query.csv=q.csv gallery.csv=g.csv tta.hflip=true
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from arcfold.data.table import raise_problems, read_csv, row_location
from arcfold.errors import DataValidationError
from arcfold.inference.config import (
    InferenceConfig,
    TableConfig,
)
from arcfold.inference.ensemble import (
    combine_experiments,
    embed_experiments,
    load_ensemble,
    reduce_fold_ensembles,
    resolve_num_workers,
)
from arcfold.inference.predict import check_rerank_spec, find_rerank_spec, predict_labels, top5_width
from arcfold.io import save_npz
from arcfold.retrieval.postprocess import load_rerank_spec, rerank_pipeline
from arcfold.retrieval.submission import submission_frame, validate_submission, write_submission
from arcfold.runtime import amp_dtype_for, resolve_device

log = logging.getLogger(__name__)

__all__ = ["ImageTable", "read_image_table", "run_inference"]


@dataclass
class ImageTable:
    ids: list[str]
    paths: list[str]
    labels: list[str] | None


def read_image_table(table: TableConfig, role: str) -> ImageTable:
    """Read and check a query/gallery CSV: columns present, ids unique and non-empty, every image file present."""
    csv = Path(table.csv)
    df = read_csv(csv)
    wanted = [table.id_column, table.image_column] + ([table.label_column] if table.label_column else [])
    missing = [c for c in wanted if c not in df]
    if missing:
        raise DataValidationError(
            f"{csv} ({role}): missing column(s) {', '.join(map(repr, missing))}; the file has {list(df.columns)}"
        )
    if df.empty:
        raise DataValidationError(f"{csv} ({role}): no data rows")
    problems = []
    for col in wanted:
        problems += [
            f"{row_location(i)}, column '{col}': empty value"
            for i in np.flatnonzero((df[col].str.strip() == "").to_numpy())
        ]
    ids = df[table.id_column]
    for i in np.flatnonzero(ids.duplicated().to_numpy()):
        problems.append(f"{row_location(i)}, column '{table.id_column}': duplicate id {ids.iat[i]!r}")
    root = Path(table.image_root) if table.image_root else csv.parent
    paths = [str(root / p) for p in df[table.image_column]]
    problems += [
        f"{row_location(i)}, column '{table.image_column}': image not found: {p}"
        for i, p in enumerate(paths)
        if not Path(p).is_file()
    ]
    raise_problems(f"{csv} ({role})", problems)
    labels = df[table.label_column].tolist() if table.label_column else None
    return ImageTable(df[table.id_column].tolist(), paths, labels)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def run_inference(cfg: InferenceConfig) -> dict[str, Any]:
    """Run the whole inference; returns a summary (paths, counts, timings, the post-processing used)."""

    timer = _Timer()

    device = resolve_device(cfg.device, key="device")
    amp_dtype = amp_dtype_for(cfg.amp, device, key="amp")
    with timer("load"):
        query = read_image_table(cfg.query, "query")
        gallery = read_image_table(cfg.gallery, "gallery")
        ensemble = load_ensemble(cfg, device)
        rerank_path = find_rerank_spec(cfg, ensemble)
        rerank = load_rerank_spec(rerank_path) if rerank_path else None
        check_rerank_spec(cfg, rerank, rerank_path)
    steps = rerank["steps"] if rerank else []
    log.info(
        "%s: %d model(s) of %d experiment(s); %d queries, %d gallery images; TTA hflip=%s scales=%s; rerank %s",
        ensemble.name,
        len(ensemble.models),
        len(ensemble.experiments),
        len(query.ids),
        len(gallery.ids),
        cfg.tta.hflip,
        list(cfg.tta.scales),
        f"{rerank['enabled']} ({rerank_path})" if rerank else "off",
    )
    embed = dict(
        tta=cfg.tta,
        batch_size=cfg.batch_size,
        device=device,
        amp_dtype=amp_dtype,
        num_workers=resolve_num_workers(cfg.num_workers, device),
        progress=cfg.progress,
    )
    with timer("embed query"):
        q_members = embed_experiments(ensemble, query.paths, desc="query", **embed)
    with timer("embed gallery"):
        g_members = embed_experiments(ensemble, gallery.paths, desc="gallery", **embed)
    if cfg.fold_pca:
        with timer("fold pca"):
            q_members, g_members = reduce_fold_ensembles(ensemble, q_members, g_members, cfg.fold_pca_dim)
    q, g = combine_experiments(ensemble, q_members), combine_experiments(ensemble, g_members)

    fmt = cfg.submission.format
    vote = dict(rerank["vote"]) if rerank and rerank.get("vote") else None
    if vote is None:
        vote = {"k": cfg.vote.k, "mode": cfg.vote.mode, "threshold": cfg.vote.threshold}
    search_kwargs = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(cfg.search)).items()}
    search_kwargs["report"] = index_reports = []  # the knob of every approximate index the searches build
    with timer("search + rerank"):
        if fmt == "retrieval":
            _, idx = rerank_pipeline(q, g, steps, min(cfg.submission.top_k, len(gallery.ids)), **search_kwargs)
            gallery_ids = np.asarray(gallery.ids, dtype=object)
            predictions, confidences = [list(gallery_ids[row]) for row in idx], None
        else:
            predictions, confidences = predict_labels(
                q, g, gallery.labels, steps, vote, fmt=fmt, new_label=cfg.submission.new_label, **search_kwargs
            )
    with timer("submission"):
        out, n_rows = _write_submission(cfg, query, gallery, predictions, confidences, vote, q, g, ensemble.name)
    total = sum(timer.seconds.values())
    log.info(
        "wrote %s (%d rows): %s; total %.1f s",
        out,
        n_rows,
        ", ".join(f"{k} {v:.1f} s" for k, v in timer.seconds.items()),
        total,
    )
    return {
        "submission": str(out),
        "rows": n_rows,
        "format": fmt,
        "models": [f"{m.experiment}/fold{m.fold}" for m in ensemble.models],
        "rerank": {
            "spec": str(rerank_path) if rerank_path else None,
            "steps": steps,
            "vote": vote if fmt != "retrieval" else None,
        },
        "search": {"index": cfg.search.index, "indexes": index_reports},
        "seconds": {**{k: round(v, 2) for k, v in timer.seconds.items()}, "total": round(total, 2)},
    }


def _write_submission(
    cfg: InferenceConfig,
    query: ImageTable,
    gallery: ImageTable,
    predictions: list,
    confidences,
    vote: dict[str, Any],
    q: np.ndarray,
    g: np.ndarray,
    default_name: str,
) -> tuple[Path, int]:
    """The submission frame, validated, written atomically (and the embeddings with ``save_embeddings``)."""
    fmt = cfg.submission.format
    frame = submission_frame(
        fmt,
        query.ids,
        predictions,
        confidences,
        id_header=cfg.submission.id_header,
        prediction_header=cfg.submission.prediction_header,
    )
    validate_submission(
        frame,
        fmt,
        query.ids,
        gallery_ids=gallery.ids,
        labels=gallery.labels,
        new_label=cfg.submission.new_label,
        id_header=cfg.submission.id_header,
        prediction_header=cfg.submission.prediction_header,
        min_predictions=top5_width(gallery.labels, vote, cfg.submission.new_label) if fmt == "top5" else None,
    )
    name = cfg.submission.name or default_name
    out = write_submission(Path(cfg.out_dir) / f"{name}.csv", frame)
    if cfg.save_embeddings:
        save_npz(
            Path(cfg.out_dir) / f"{name}.npz",
            query_ids=np.asarray(query.ids, dtype=str),
            query=q,
            gallery_ids=np.asarray(gallery.ids, dtype=str),
            gallery=g,
        )
    return out, len(frame)
