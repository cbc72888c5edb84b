"""Training throughput: arcfold's epoch loop on its real data path against a bare loop on preloaded tensors.

Both train the *same* model, head, optimiser and batch (``configs/omniglot_arcface.yaml``'s: resnet18, ArcFace
head, 64 px, its batch size; the JSON records them; fold 0's training images), so the only differences are what
``train_fold.sh`` adds around the step:

* arcfold: ``arcfold.training.loop.train_one_epoch`` fed by ``ImageDataset(cache=True)`` (decoded, resized images cached
  in memory), the config's albumentations augmentation on uint8 and a DataLoader (``num_workers`` from the config) whose
  collate normalises each batch at once (``train.build_train_collate``, as ``train_fold`` builds it), plus its
  per-step guards (non-finite loss/gradient checks, clipping above ``train.grad_clip``, margin warm-up, scheduler).
* bare: ``loss = head(model(x), y); loss.backward(); optimizer.step()`` on (N, 3, 64, 64) float tensors decoded
  and normalised before the clock starts (no augmentation).

Rounds alternate (``--rounds`` x ``--round-batches`` batches each, medians) in one process so machine drift hits
both alike; the first round is a warm-up and the image cache is filled before timing. Peak memory: a fresh
subprocess per loop (``ru_maxrss``). When the ratio is below 0.95, the per-batch cost of each stage (data loading
alone, the bare step, the guard overhead) is reported. CUDA/AMP rows are skipped without a GPU. Run from the
project root (needs ``../shared/data/omniglot``)::

    python benchmarks/bench_train.py [--rounds 6] [--round-batches 10]

Writes ``benchmarks/results/bench_train.json`` and its section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import (  # noqa: E402
    NO_GPU,
    cuda_available,
    machine,
    machine_line,
    peak_rss_mib,
    run_worker,
    write_results,
)

NAME = "bench_train"
CONFIG = "configs/omniglot_arcface.yaml"


def setup(fold: int = 0) -> dict:
    """Config, data set, loaders and two identical (model, head, optimiser) copies."""
    import copy

    from torch.utils.data import DataLoader

    from arcfold.config import load_config
    from arcfold.data.dataset import ImageDataset
    from arcfold.data.folds import ensure_folds, load_folds
    from arcfold.data.table import FOLD, LABEL, image_root, resolve_image_paths
    from arcfold.data.transforms import build_train_transform
    from arcfold.datasets.prepare import ensure_dataset
    from arcfold.models.embedding import build_model
    from arcfold.models.heads import build_head
    from arcfold.runtime import seed_everything
    from arcfold.training.loop import build_train_collate
    from arcfold.training.schedule import build_optimizer

    cfg = load_config(CONFIG, ["name=bench_train", "train.progress=false"])
    ensure_dataset(cfg)
    ensure_folds(cfg)
    folds_df = load_folds(cfg.folds_path)
    train_df = folds_df[folds_df[FOLD] != fold].reset_index(drop=True)
    classes = np.sort(train_df[LABEL].unique())
    labels = np.searchsorted(classes, train_df[LABEL].to_numpy())
    size = cfg.data.image_size
    paths = resolve_image_paths(train_df, image_root(cfg.data))
    transform = build_train_transform(cfg.data.augment, size, cfg.data.hflip, seed=0, normalise=False)  # uint8
    collate, _ = build_train_collate(torch.device("cpu"))  # stacks + normalises each batch in the loader
    dataset = ImageDataset(paths, labels, transform, cache=cfg.data.cache_images, size=size, progress=False)
    dataset.set_augment_seed(0)  # reseeded per sample, as train_fold does
    seed_everything(0)
    model = build_model(cfg.model)
    head = build_head(cfg.head, cfg.model.embedding_size, len(classes))
    bare_model, bare_head = copy.deepcopy(model), copy.deepcopy(head)
    s = {
        "cfg": cfg,
        "paths": paths,
        "labels": labels,
        "dataset": dataset,
        "model": model,
        "head": head,
        "optimizer": build_optimizer(cfg, model, head),
        "bare_model": bare_model,
        "bare_head": bare_head,
        "bare_optimizer": build_optimizer(cfg, bare_model, bare_head),
    }

    def loader() -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            persistent_workers=False,
        )

    s["loader"] = loader
    return s


def preload(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from arcfold.data.dataset import read_image
    from arcfold.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    size = s["cfg"].data.image_size
    images = np.stack([read_image(p, size) for p in s["paths"]])  # (N, H, W, 3) uint8
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std).contiguous(), torch.from_numpy(s["labels"])  # (N, 3, H, W), (N,)


def arcfold_round(s: dict, batches: int) -> float:
    """Images/s of ``batches`` batches of arcfold's epoch function on its data path."""
    from arcfold.training.loop import train_one_epoch
    from arcfold.training.step import OptimizerStep

    cfg = s["cfg"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(s["optimizer"], lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for g in s["optimizer"].param_groups for p in g["params"]]
    stats = train_one_epoch(
        cfg, s["model"], s["head"], s["loader"](), batches,
        OptimizerStep.from_config(cfg, s["optimizer"], scheduler, scaler, params),
        torch.device("cpu"), None, 1,
    )  # fmt: skip
    return stats["train_images_per_s"]


def bare_round(s: dict, x: torch.Tensor, y: torch.Tensor, batches: int) -> float:
    model, head, opt, bs = s["bare_model"], s["bare_head"], s["bare_optimizer"], s["cfg"].train.batch_size
    model.train()
    head.train()
    order = torch.randperm(len(x))
    t0 = time.time()
    for b in range(batches):
        idx = order[b * bs : (b + 1) * bs]
        loss = head(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batches * bs / (time.time() - t0)


def data_only_round(s: dict, batches: int) -> float:
    """Seconds per batch of the DataLoader alone (cached images, augmentation, collate)."""
    t0 = time.time()
    for i, _ in enumerate(s["loader"]()):
        if i + 1 >= batches:
            break
    return (time.time() - t0) / batches


def worker(args: dict) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    s = setup()
    if args["impl"] == "bare":
        x, y = preload(s)
    else:
        for i in range(len(s["dataset"])):  # fill the cache before the clock, as the main run does
            s["dataset"][i]
    base = peak_rss_mib()
    rate = bare_round(s, x, y, args["batches"]) if args["impl"] == "bare" else arcfold_round(s, args["batches"])
    peak = peak_rss_mib()
    return {**args, "images_per_s": rate, "base_mib": base, "peak_mib": peak, "extra_mib": peak - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--round-batches", type=int, default=10)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return

    cuda_available(NAME)
    torch.set_num_threads(os.cpu_count() or 1)
    s = setup()
    x, y = preload(s)
    for i in range(len(s["dataset"])):  # fill the image cache before any timing
        s["dataset"][i]
    arcfold_round(s, 2), bare_round(s, x, y, 2)  # warm-up
    rates: dict[str, list[float]] = {"arcfold": [], "bare": []}
    for r in range(a.rounds):
        for name in ("arcfold", "bare") if r % 2 == 0 else ("bare", "arcfold"):
            rate = arcfold_round(s, a.round_batches) if name == "arcfold" else bare_round(s, x, y, a.round_batches)
            rates[name].append(rate)
        print(f"[{NAME}] round {r}: arcfold {rates['arcfold'][-1]:.1f} img/s, bare {rates['bare'][-1]:.1f} img/s")
    bs = s["cfg"].train.batch_size
    data_s = float(np.median([data_only_round(s, a.round_batches) for _ in range(3)]))
    memory = {impl: run_worker(__file__, {"impl": impl, "batches": a.round_batches}) for impl in ("arcfold", "bare")}
    cfg = s["cfg"]
    payload = summarise(rates, data_s, bs)
    payload = {
        **payload,
        "machine": machine(),
        "config": CONFIG,
        "n_train_images": len(s["paths"]),
        "image_size": cfg.data.image_size,
        "batch_size": bs,
        "num_workers": cfg.data.num_workers,
        "channels_last": cfg.train.channels_last,
        "rounds": a.rounds,
        "round_batches": a.round_batches,
        "memory": memory,
        "cuda": "skipped: " + NO_GPU,
    }
    print(f"[{NAME}] ratio {payload['ratio_arcfold_over_bare']:.3f}; profile {payload['profile']}; memory {memory}")
    write_results(NAME, payload, markdown(payload, a))


def summarise(rates: dict[str, list[float]], data_s: float, bs: int) -> dict:
    """Ratios robust to drift: the median of per-round ratios (each round pairs both loops in time) and the ratio
    of each loop's best round (the least disturbed); the profile uses the best rounds."""
    paired = [o / b for o, b in zip(rates["arcfold"], rates["bare"], strict=True)]
    best = {k: max(v) for k, v in rates.items()}
    profile = {
        "data_loader_ms_per_batch": 1000 * data_s,
        "bare_step_ms_per_batch": 1000 * bs / best["bare"],
        "arcfold_ms_per_batch": 1000 * bs / best["arcfold"],
    }
    profile["unexplained_ms_per_batch"] = (
        profile["arcfold_ms_per_batch"] - profile["bare_step_ms_per_batch"] - profile["data_loader_ms_per_batch"]
    )
    ratio = float(np.median(paired))
    return {
        "images_per_s": rates,
        "per_round_ratio": paired,
        "median_images_per_s": {k: float(np.median(v)) for k, v in rates.items()},
        "best_images_per_s": best,
        "ratio_arcfold_over_bare": ratio,
        "ratio_of_best_rounds": best["arcfold"] / best["bare"],
        "target_met": ratio >= 0.95,
        "profile": profile,
    }


def markdown(pl: dict, a: argparse.Namespace) -> str:
    best, pr, mem = pl["best_images_per_s"], pl["profile"], pl["memory"]
    ratio = pl["ratio_arcfold_over_bare"]
    verdict = "**met**" if pl["target_met"] else f"**not met** (shortfall {(0.95 - ratio) * 100:.1f} points)"

    def mib(impl: str) -> str:
        m = mem[impl]
        return m["error"][:60] if "error" in m else f"{m['peak_mib']:.0f} (+{m['extra_mib']:.0f})"

    return "\n".join(
        [
            "## Training throughput: `train_one_epoch` on the real data path vs a bare loop on preloaded tensors",
            "",
            f"Command: `python benchmarks/bench_train.py --rounds {a.rounds} --round-batches {a.round_batches}`  ",
            f"Machine: {machine_line(pl['machine'])}  ",
            f"GPU: {NO_GPU}; CUDA fp16/bf16 rows skipped.",
            "",
            f"Same model, head and optimiser (`{pl['config']}`: resnet18, {pl['image_size']} px, batch "
            f"{pl['batch_size']}, {pl['n_train_images']} fold-0 training images; num_workers={pl['num_workers']}, "
            f"channels_last={pl['channels_last']}). Alternating rounds ({pl['rounds']} x {pl['round_batches']} "
            "batches), medians, one process; the image cache is filled first. Peak RSS: one fresh subprocess per "
            "loop, peak (+ extra over the loaded data). Shared noisy 2-core VM: compare the ratio.",
            "",
            "Per round, arcfold / bare img/s: "
            + ", ".join(
                f"{o:.1f}/{b:.1f}"
                for o, b in zip(pl["images_per_s"]["arcfold"], pl["images_per_s"]["bare"], strict=True)
            )
            + ". Ratio = median of the per-round ratios (each round pairs the two loops in time).",
            "",
            "| best arcfold img/s | best bare img/s | ratio (median per round) | ratio of best rounds | target >= 0.95 "
            "| arcfold peak MiB | bare peak MiB |",
            "|---|---|---|---|---|---|---|",
            f"| {best['arcfold']:.1f} | {best['bare']:.1f} | {ratio:.3f} | {pl['ratio_of_best_rounds']:.3f} "
            f"| {verdict} | {mib('arcfold')} | {mib('bare')} |",
            "",
            "ms per batch (best rounds): data loader alone (cache + augmentation + collate, measured separately), the "
            "bare step, arcfold's whole step, and what is left (guards, scheduler, `loss.item()` syncs, noise):",
            "",
            "| data loader | bare step | arcfold step | remainder |",
            "|---|---|---|---|",
            f"| {pr['data_loader_ms_per_batch']:.1f} | {pr['bare_step_ms_per_batch']:.1f} | "
            f"{pr['arcfold_ms_per_batch']:.1f} | {pr['unexplained_ms_per_batch']:.1f} |",
        ]
    )


if __name__ == "__main__":
    main()
