#!/usr/bin/env python
"""Retrieval inference: embed query and gallery images with an experiment's fold models, search, write a submission.

Runs offline (an internet-less Kaggle notebook): weights come only from ``--models-dir`` (which may be
read-only), nothing is downloaded, and the code needs no install step: this file puts its own
``src/`` on ``sys.path``, so ``python /kaggle/input/arcfold-code/inference.py ...`` works from any
working directory.

* Every ``fold<K>.pt`` of the experiment embeds both sets; the fold ensemble is the mean of the
  L2-normalised embeddings, normalised again. ``--tta-flip`` adds the horizontally flipped image.
* Search is exact inner product (cosine): faiss ``IndexFlatIP`` when faiss is installed, else the
  chunked torch search of :func:`arcfold.metrics.knn` (same results; ties by gallery order).
* Output ``submissions/<name>.csv`` (written atomically): ``id,neighbours,similarities`` with the
  top-k gallery ids space-separated, best first.

Query/gallery CSVs need an id column and an image column (``--id-column``, ``--image-column``);
image paths are relative to ``--image-root`` (default: the CSV's folder).

    python inference.py --experiment glyphs_arcface --query q.csv --gallery g.csv --top-k 10
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("arcfold.inference")


def read_image_table(csv: Path, id_column: str, image_column: str, image_root: Path | None) -> tuple[list, list]:
    from arcfold.data.table import DataValidationError, read_csv

    df = read_csv(csv)
    missing = [c for c in (id_column, image_column) if c not in df]
    if missing:
        raise DataValidationError(f"{csv}: missing column(s) {missing}; the file has {list(df.columns)}")
    if df[id_column].duplicated().any():
        dup = df.loc[df[id_column].duplicated(), id_column].iloc[0]
        raise DataValidationError(f"{csv}: duplicate id {dup!r} in column '{id_column}'")
    root = image_root if image_root is not None else csv.parent
    paths = [str(root / p) for p in df[image_column]]
    absent = [(i, p) for i, p in enumerate(paths) if not Path(p).is_file()]
    if absent:
        i, p = absent[0]
        raise DataValidationError(
            f"{csv}: {len(absent)} image(s) not found, first: row {i}, column '{image_column}': {p}"
        )
    return df[id_column].tolist(), paths


def embed_with_models(checkpoints: list[Path], paths: list[str], batch_size: int, tta_flip: bool, device) -> np.ndarray:
    from arcfold.data.dataset import ImageDataset
    from arcfold.data.transforms import build_eval_transform
    from arcfold.embed import extract_embeddings
    from arcfold.models.embedding import load_embedding_model

    total = None
    for ckpt in checkpoints:
        model, cfg, _ = load_embedding_model(ckpt, device)
        size = cfg.data.image_size
        dataset = ImageDataset(paths, None, build_eval_transform(size), cache=True, cache_size=size)
        views = [extract_embeddings(model, dataset, batch_size=batch_size, device=device, desc=f"{ckpt.stem}")]
        if tta_flip:
            dataset.transform = build_eval_transform(size, hflip=True)  # same decoded cache, flipped view
            views.append(extract_embeddings(model, dataset, batch_size=batch_size, device=device, desc="flip"))
        emb = np.mean(views, axis=0)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        total = emb if total is None else total + emb
    total /= np.linalg.norm(total, axis=1, keepdims=True)
    return total.astype(np.float32)  # (N, D), unit norm


def search(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        import faiss
    except ImportError:  # faiss is optional: the exact torch search gives the same neighbours
        from arcfold.metrics import knn

        return knn(queries, gallery, k)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery))
    sims, idx = index.search(np.ascontiguousarray(queries), k)
    return sims, idx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="name of the experiment (folder under --models-dir)")
    parser.add_argument("--models-dir", default="models", help="folder holding <experiment>/fold<K>.pt (read-only ok)")
    parser.add_argument("--query", required=True, type=Path, help="CSV of query images")
    parser.add_argument("--gallery", required=True, type=Path, help="CSV of gallery (index) images")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--image-root", type=Path, default=None, help="image paths are relative to this folder")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--tta-flip", action="store_true", help="also embed horizontally flipped images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default="submissions", type=Path)
    parser.add_argument("--name", default=None, help="submission file name (default: the experiment's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from arcfold.io import save_text

    started = time.time()
    checkpoints = sorted((Path(args.models_dir) / args.experiment).glob("fold*.pt"))
    if not checkpoints:
        log.error("no fold<K>.pt in %s", Path(args.models_dir) / args.experiment)
        return 2
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    query_ids, query_paths = read_image_table(args.query, args.id_column, args.image_column, args.image_root)
    gallery_ids, gallery_paths = read_image_table(args.gallery, args.id_column, args.image_column, args.image_root)
    k = min(args.top_k, len(gallery_ids))
    log.info(
        "%d fold models, %d queries, %d gallery images, top-%d", len(checkpoints), len(query_ids), len(gallery_ids), k
    )
    q = embed_with_models(checkpoints, query_paths, args.batch_size, args.tta_flip, device)
    g = embed_with_models(checkpoints, gallery_paths, args.batch_size, args.tta_flip, device)
    sims, idx = search(q, g, k)
    gallery_ids = np.asarray(gallery_ids, dtype=object)
    submission = pd.DataFrame(
        {
            "id": query_ids,
            "neighbours": [" ".join(map(str, gallery_ids[row])) for row in idx],
            "similarities": [" ".join(f"{s:.5f}" for s in row) for row in sims],
        }
    )
    out = args.out_dir / f"{args.name or args.experiment}.csv"
    save_text(out, submission.to_csv(index=False))
    log.info("wrote %s (%d rows) in %.1f s", out, len(submission), time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
