"""Omniglot training throughput: arcfold's training step against a bare PyTorch + PML step, interleaved.

A speed measurement only, never a quality comparison: the bare step (``timm.create_model('resnet18',
num_classes=512)``, PML ``ArcFaceLoss`` with its defaults, Adam, no augmentation, images preloaded as tensors) is
the cheapest loop one can write, so its data path costs nothing. The fair *quality* reference is
``benchmarks/reference_loop.py``, compared in ``benchmarks/omniglot.py``.

Both loops train on fold ``--fold``'s training rows (resnet18, 64 px, batch 64). These 2-core VMs drift by 10-20%
over minutes, so the two are timed in alternating rounds in one process (``--rounds`` rounds of
``--round-batches`` batches each, first batch included) and the medians compared; the load average before and
after is recorded (a run made while other jobs hold the cores is not a measurement).
Run from the project root (needs ``../shared/data/omniglot``)::

    python benchmarks/omniglot_throughput.py [--fold 0] [--rounds 7] [--round-batches 12]

Writes ``benchmarks/results/omniglot_throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from pytorch_metric_learning.losses import ArcFaceLoss

from arcfold.config import load_config
from arcfold.data.dataset import read_image
from arcfold.data.folds import ensure_folds, load_folds
from arcfold.data.table import FOLD, LABEL, image_root, resolve_image_paths
from arcfold.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from arcfold.datasets.prepare import ensure_dataset
from arcfold.io import save_json, save_text

log = logging.getLogger("benchmark")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import load_line, load_record  # noqa: E402

RESULTS = Path("benchmarks/results")


def load_tensors(paths: list[str], size: int) -> torch.Tensor:
    images = np.stack([read_image(p, size) for p in paths])  # (N, H, W, 3) uint8
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std  # (N, 3, H, W)


def reference_step(cfg, n_classes: int):
    """The bare step timed against ours: timm backbone to 512-d + PML ArcFaceLoss (defaults) + Adam."""
    model = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=cfg.model.embedding_size)
    loss_fn = ArcFaceLoss(num_classes=n_classes, embedding_size=cfg.model.embedding_size)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=cfg.optim.lr)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, step


def interleaved_throughput(cfg, fold: int, rounds: int = 7, batches: int = 12) -> dict:
    """Training images/s of both loops measured in alternating rounds, so machine drift hits both alike.

    Ours is arcfold's real epoch function on the real data path (cached images, albumentations, batches
    collated by a DataLoader); the reference steps on preloaded tensors. Each round times ``batches``
    batches of each, first batch included.
    """
    from torch.utils.data import DataLoader

    from arcfold.data.dataset import ImageDataset
    from arcfold.data.transforms import build_train_transform
    from arcfold.models.embedding import build_model
    from arcfold.models.heads import build_head
    from arcfold.training.loop import train_one_epoch
    from arcfold.training.schedule import build_optimizer
    from arcfold.training.step import OptimizerStep

    folds_df = load_folds(cfg.folds_path)
    train_df = folds_df[(folds_df[FOLD] >= 0) & (folds_df[FOLD] != fold)].reset_index(drop=True)  # test rows out
    classes = np.sort(train_df[LABEL].unique())
    labels = np.searchsorted(classes, train_df[LABEL].to_numpy())
    size, bs = cfg.data.image_size, cfg.train.batch_size
    paths = resolve_image_paths(train_df, image_root(cfg.data))
    transform = build_train_transform(cfg.data.augment, size, cfg.data.hflip, seed=0)
    dataset = ImageDataset(paths, labels, transform, cache=True, size=size, progress=False)
    dataset.set_augment_seed(0)  # reseeded per sample, as train_fold does
    model = build_model(cfg.model)
    head = build_head(cfg.head, cfg.model.embedding_size, len(classes))
    optimizer = build_optimizer(cfg, model, head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    cfg.train.progress = False

    x_ref, y_ref = load_tensors(paths, size), torch.from_numpy(labels)
    _, ref_step = reference_step(cfg, len(classes))
    ours, ref = [], []
    for _ in range(rounds):
        loader = DataLoader(dataset, batch_size=bs, shuffle=True, drop_last=True)
        stats = train_one_epoch(
            cfg,
            model,
            head,
            loader,
            batches,
            OptimizerStep.from_config(cfg, optimizer, scheduler, scaler, params),
            torch.device("cpu"),
            None,
            0,
        )
        ours.append(stats["train_images_per_s"])
        order = torch.randperm(len(x_ref))
        t0 = time.time()
        for b in range(batches):
            idx = order[b * bs : (b + 1) * bs]
            ref_step(x_ref[idx], y_ref[idx])
        ref.append(batches * bs / (time.time() - t0))
        log.info("interleaved round: ours %.1f img/s, reference %.1f img/s", ours[-1], ref[-1])
    return {
        "rounds": rounds,
        "batches_per_round": batches,
        "arcfold_images_per_s": ours,
        "reference_images_per_s": ref,
        "median_arcfold": float(np.median(ours)),
        "median_reference": float(np.median(ref)),
        "ratio": float(np.median(ours) / np.median(ref)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/omniglot_arcface.yaml")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    parser.add_argument("--round-batches", type=int, default=12, help="batches per round")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, ["name=bench_omniglot_throughput", "train.progress=false", *args.overrides])
    ensure_dataset(cfg)
    ensure_folds(cfg)
    started = time.time()
    interleaved = interleaved_throughput(cfg, args.fold, args.rounds, args.round_batches)
    result = {
        "benchmark": "omniglot_throughput",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "load": load_record(),  # the run's load averages; busy when the 1-min load exceeded the cores
        "fold": args.fold,
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.train.batch_size,
        **interleaved,
        "seconds": round(time.time() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_json(RESULTS / "omniglot_throughput.json", result)
    lines = [
        f"# Omniglot training throughput (fold {args.fold}, {cfg.model.backbone} {cfg.data.image_size}px, "
        f"batch {cfg.train.batch_size})",
        "",
        f"`{result['command']}` on {result['machine']}.",
        "",
        f"arcfold / bare PyTorch + PML step, training images per second: ratio {interleaved['ratio']:.3f} "
        f"(medians {interleaved['median_arcfold']:.1f} / {interleaved['median_reference']:.1f} img/s over "
        f"{interleaved['rounds']} alternating rounds of {interleaved['batches_per_round']} batches). A speed "
        "measurement only: the bare step is not a quality reference (see `benchmarks/omniglot.py`).",
        "",
        load_line(result["load"]),
    ]
    save_text(RESULTS / "omniglot_throughput.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
