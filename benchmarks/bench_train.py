"""Training throughput: arcfold's epoch loop on its real data path against bare loops on preloaded tensors.

All loops train the *same* model, head, optimiser and batch (``configs/omniglot_arcface.yaml``'s: resnet18, ArcFace
head, 64 px, its batch size, its ``shift`` augmentation; the JSON records them; fold 0's training images), so the
only differences are what ``train_fold.sh`` adds around the step:

* ``arcfold``: ``arcfold.training.loop.train_one_epoch`` fed by ``ImageDataset(cache=True)`` (decoded, resized images
  cached in memory) and a DataLoader (``num_workers`` from the config) of uint8 batches; the shift is drawn and
  applied to the whole batch (``arcfold.data.transforms.BatchShift``, ``data.batch_augment=true``, the default) and
  the batch normalised after it, as ``train_fold`` builds it; plus the per-step guards (non-finite loss/gradient
  checks, clipping above ``train.grad_clip``, margin warm-up, scheduler).
* ``arcfold_per_image``: the same with ``data.batch_augment=false``: albumentations' ``Affine`` shift per image in
  the loader, the batch normalised in the collate (the data path before batch-level augmentation).
* ``bare``: ``loss = head(model(x), y); loss.backward(); optimizer.step()`` on (N, 3, 64, 64) float tensors decoded
  and normalised before the clock starts (no augmentation).
* ``bare_foreach``: the ``bare`` loop with the optimizer arcfold had before it was fused (the same groups and
  hyper-parameters, torch's ``foreach`` implementation): what fusing gains.
* ``bare_shift``: the bare loop doing the same augmentation a user would write: preloaded uint8 tensors, each
  image of the batch shifted by its own random ``(dx, dy)`` in [-4, 4] with replicated borders (one ``gather``
  per axis, written here, not arcfold's code), then ``(x / 255 - mean) / std``.

Rounds alternate (``--rounds`` x ``--round-batches`` batches each, the loops' order rotated each round, medians)
in one process so machine drift hits all alike. By default a round is one batch of each loop: this VM's speed
changes within seconds (the same loop measured 90 and 150 img/s in consecutive rounds of 10 batches, 2.5 s, on a
machine otherwise idle), so the loops alternate batch by batch and each keeps its loader's iterator across
rounds. A warm-up comes first and the image caches are filled before timing. Peak memory: a fresh subprocess
per loop (``ru_maxrss``). The per-batch cost of each stage (each data loader alone, the bare step, the
remainder) is reported. CUDA/AMP rows are skipped without a GPU. Run from the project root (needs
``../shared/data/omniglot``)::

    python benchmarks/bench_train.py [--rounds 240] [--round-batches 1] [--set KEY=VALUE ... --name NAME]

Writes ``benchmarks/results/bench_train.json`` and its section of ``BENCHMARKS.md``; with ``--set`` (config
overrides, e.g. ``model.output_stride=null`` for the backbone's own stride) ``bench_train_<NAME>`` instead.
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
LOOPS = ("arcfold", "arcfold_per_image", "bare", "bare_shift", "bare_foreach")
TARGET = 0.95


def setup(overrides: list[str], fold: int = 0) -> dict:
    """Config, the two arcfold data paths, and three identical (model, head, optimiser) copies: one for the arcfold
    loops, one for the bare loops, one for the bare loop with the foreach optimizer."""
    import copy

    from torch.utils.data import DataLoader

    from arcfold.config import load_config
    from arcfold.data.dataset import ImageDataset
    from arcfold.data.folds import ensure_folds, load_folds
    from arcfold.data.table import FOLD, LABEL, image_root, resolve_image_paths
    from arcfold.data.transforms import build_batch_augment, build_train_transform
    from arcfold.datasets.prepare import ensure_dataset
    from arcfold.models.embedding import build_model
    from arcfold.models.heads import build_head
    from arcfold.runtime import seed_everything
    from arcfold.training.loop import build_train_collate
    from arcfold.training.schedule import build_optimizer

    cfg = load_config(CONFIG, ["name=bench_train", "train.progress=false", *overrides])
    ensure_dataset(cfg)
    ensure_folds(cfg)
    folds_df = load_folds(cfg.folds_path)
    train_df = folds_df[folds_df[FOLD] != fold].reset_index(drop=True)
    classes = np.sort(train_df[LABEL].unique())
    labels = np.searchsorted(classes, train_df[LABEL].to_numpy())
    size, aug = cfg.data.image_size, cfg.data.augment
    paths = resolve_image_paths(train_df, image_root(cfg.data))
    cpu = torch.device("cpu")
    paths_by_loop = {}
    for name, batch_level in (("arcfold", True), ("arcfold_per_image", False)):  # as train_fold builds them
        augment = build_batch_augment(aug, size, batch_level)
        if batch_level and augment is None:
            raise SystemExit(f"{CONFIG}: data.augment={aug} has no batch-level version; nothing to compare")
        transform = build_train_transform(aug, size, cfg.data.hflip, seed=0, normalise=False, batch_level=batch_level)
        dataset = ImageDataset(paths, labels, transform, cache=cfg.data.cache_images, size=size, progress=False)
        if transform is not None:
            dataset.set_augment_seed(0)  # reseeded per sample, as train_fold does
        if augment is not None:
            augment.start_epoch(0)
        collate, normalise = build_train_collate(cpu, batch_augment=augment is not None)
        paths_by_loop[name] = {"dataset": dataset, "collate": collate, "normalise": normalise, "augment": augment}
    seed_everything(0)
    model = build_model(cfg.model)
    head = build_head(cfg.head, cfg.model.embedding_size, len(classes))
    bare_model, bare_head = copy.deepcopy(model), copy.deepcopy(head)
    foreach_model, foreach_head = copy.deepcopy(model), copy.deepcopy(head)
    fused = build_optimizer(cfg, foreach_model, foreach_head)
    foreach_groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in fused.param_groups]
    s = {
        "cfg": cfg,
        "paths": paths,
        "labels": labels,
        "data": paths_by_loop,
        "model": model,
        "head": head,
        "optimizer": build_optimizer(cfg, model, head),
        "bare_model": bare_model,
        "bare_head": bare_head,
        "bare_optimizer": build_optimizer(cfg, bare_model, bare_head),
        # the optimizer before it was fused: the same groups, torch's foreach implementation
        "foreach_model": foreach_model,
        "foreach_head": foreach_head,
        "foreach_optimizer": type(fused)(foreach_groups, foreach=True),
        "shift_limit": paths_by_loop["arcfold"]["augment"].limit,  # the preset's, for the bare loop's own shift
    }

    def loader(name: str) -> DataLoader:
        d = paths_by_loop[name]
        return DataLoader(
            d["dataset"],
            batch_size=cfg.train.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            collate_fn=d["collate"],
            persistent_workers=False,
        )

    s["loader"] = loader
    return s


def fill_caches(s: dict) -> None:
    for d in s["data"].values():
        for i in range(len(d["dataset"])):
            d["dataset"][i]


def preload(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) uint8 images and (N,) labels, decoded and resized before any clock."""
    from arcfold.data.dataset import read_image

    size = s["cfg"].data.image_size
    images = np.stack([read_image(p, size) for p in s["paths"]])  # (N, H, W, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(s["labels"])


def normalised(x_uint8: torch.Tensor) -> torch.Tensor:
    from arcfold.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x_uint8.float() / 255.0 - mean) / std).contiguous()


def next_batches(s: dict, name: str, batches: int):
    """The next ``batches`` batches of data path ``name``'s loader, one persistent iterator across rounds (a new
    shuffled epoch when it runs out), so that a round of one batch does not pay for a new DataLoader."""
    iters = s.setdefault("iters", {})
    for _ in range(batches):
        try:
            yield next(iters[name])
        except (KeyError, StopIteration):
            iters[name] = iter(s["loader"](name))
            yield next(iters[name])


def arcfold_round(s: dict, name: str, batches: int) -> float:
    """Images/s of ``batches`` batches of arcfold's epoch function on its data path ``name``."""
    from arcfold.training.loop import train_one_epoch
    from arcfold.training.step import OptimizerStep

    cfg, d = s["cfg"], s["data"][name]
    scheduler = torch.optim.lr_scheduler.LambdaLR(s["optimizer"], lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for g in s["optimizer"].param_groups for p in g["params"]]
    stats = train_one_epoch(
        cfg, s["model"], s["head"], next_batches(s, name, batches), batches,
        OptimizerStep.from_config(cfg, s["optimizer"], scheduler, scaler, params),
        torch.device("cpu"), None, 1, normalise=d["normalise"], augment=d["augment"],
    )  # fmt: skip
    return stats["train_images_per_s"]


def random_shift(x: torch.Tensor, limit: int) -> torch.Tensor:
    """What a user writes for a per-image random shift with replicated borders: clamped indices, a gather per axis."""
    b, c, h, w = x.shape
    dx, dy = torch.randint(-limit, limit + 1, (2, b, 1))
    rows = (torch.arange(h) - dy).clamp(0, h - 1)  # (B, H)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)  # (B, W)
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def bare_round(s: dict, x: torch.Tensor, y: torch.Tensor, batches: int, shift: bool, prefix: str = "bare") -> float:
    """The bare loop on preloaded tensors: float and normalised already (``shift=False``), or uint8 shifted and
    normalised per batch inside the clock (``shift=True``); ``prefix="foreach"``: the foreach optimizer's copy."""
    model, head, opt = s[f"{prefix}_model"], s[f"{prefix}_head"], s[f"{prefix}_optimizer"]
    bs = s["cfg"].train.batch_size
    model.train()
    head.train()
    order = torch.randperm(len(x))
    t0 = time.time()
    for b in range(batches):
        idx = order[b * bs : (b + 1) * bs]
        images = normalised(random_shift(x[idx], s["shift_limit"])) if shift else x[idx]
        loss = head(model(images), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batches * bs / (time.time() - t0)


def data_only_round(s: dict, name: str, batches: int) -> float:
    """Seconds per batch of a data path alone: the DataLoader (cached images, per-image work, collate) and, for the
    batch-level path, the shift and normalisation train_one_epoch applies to each batch."""
    d = s["data"][name]
    t0 = time.time()
    for i, (images, _) in enumerate(s["loader"](name)):
        if d["augment"] is not None:
            images = d["augment"](images)
        if d["normalise"] is not None:
            images = d["normalise"](images)
        if i + 1 >= batches:
            break
    return (time.time() - t0) / batches


def run_loop(s: dict, name: str, data: dict[str, torch.Tensor], batches: int) -> float:
    if name.startswith("arcfold"):
        return arcfold_round(s, name, batches)
    if name == "bare_foreach":
        return bare_round(s, *data["bare"], batches, shift=False, prefix="foreach")
    return bare_round(s, *data[name], batches, shift=name == "bare_shift")


def bare_data(s: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x8, y = preload(s)
    return {"bare": (normalised(x8), y), "bare_shift": (x8, y)}


def worker(args: dict) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    s = setup(args["set"])
    data = bare_data(s) if args["impl"].startswith("bare") else {}
    if not data:
        fill_caches(s)  # fill the cache before the clock, as the main run does
    base = peak_rss_mib()
    rate = run_loop(s, args["impl"], data, args["batches"])
    peak = peak_rss_mib()
    return {**args, "images_per_s": rate, "base_mib": base, "peak_mib": peak, "extra_mib": peak - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=240)
    p.add_argument("--round-batches", type=int, default=1)
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help=f"config overrides on top of {CONFIG} (e.g. model.output_stride=null); the results then go to "
        "bench_train_<--name>",
    )  # fmt: skip
    p.add_argument("--name", default="", help="suffix of the results' name when --set is given")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.set and not a.name:
        p.error("--set needs --name (the results of the defaults are bench_train's)")
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return

    cuda_available(NAME)
    torch.set_num_threads(os.cpu_count() or 1)
    s = setup(a.set)
    data = bare_data(s)
    fill_caches(s)  # before any timing
    for name in LOOPS:  # warm-up
        run_loop(s, name, data, 2)
    rates: dict[str, list[float]] = {name: [] for name in LOOPS}
    for r in range(a.rounds):
        for name in LOOPS[r % len(LOOPS) :] + LOOPS[: r % len(LOOPS)]:  # each loop leads in turn
            rates[name].append(run_loop(s, name, data, a.round_batches))
        print(f"[{NAME}] round {r}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()) + " img/s")
    bs = s["cfg"].train.batch_size
    data_s = {
        name: float(np.median([data_only_round(s, name, a.round_batches) for _ in range(3)]))
        for name in ("arcfold", "arcfold_per_image")
    }
    memory = {impl: run_worker(__file__, {"impl": impl, "batches": a.round_batches, "set": a.set}) for impl in LOOPS}
    cfg = s["cfg"]
    payload = summarise(rates, data_s, bs)
    payload = {
        **payload,
        "machine": machine(),
        "config": CONFIG,
        "overrides": a.set,
        "output_stride": cfg.model.output_stride,
        "augment": cfg.data.augment,
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
    print(f"[{NAME}] ratios {payload['ratios']}; profile {payload['profile']}")
    write_results(f"{NAME}_{a.name}" if a.set else NAME, payload, markdown(payload, a))


def summarise(rates: dict[str, list[float]], data_s: dict[str, float], bs: int) -> dict:
    """Ratios robust to drift: the median of per-round ratios (each round runs every loop back to back) and the
    ratio of each loop's best round (the least disturbed); the profile uses the best rounds."""
    best = {k: max(v) for k, v in rates.items()}
    pairs = [(a, b) for a in ("arcfold", "arcfold_per_image") for b in ("bare", "bare_shift")]
    pairs += [("bare_shift", "bare"), ("bare_foreach", "bare")]
    per_round = {f"{a}/{b}": [x / y for x, y in zip(rates[a], rates[b], strict=True)] for a, b in pairs}
    ratios = {k: float(np.median(v)) for k, v in per_round.items()}
    quartiles = {k: [float(q) for q in np.percentile(v, [25, 75])] for k, v in per_round.items()}
    profile = {
        "bare_step_ms_per_batch": 1000 * bs / best["bare"],
        "bare_shift_ms_per_batch": 1000 * bs / best["bare_shift"],
    }
    for name in ("arcfold", "arcfold_per_image"):
        step_ms = 1000 * bs / best[name]
        profile[f"{name}_data_ms_per_batch"] = 1000 * data_s[name]
        profile[f"{name}_ms_per_batch"] = step_ms
        profile[f"{name}_remainder_ms_per_batch"] = step_ms - profile["bare_step_ms_per_batch"] - 1000 * data_s[name]
    return {
        "images_per_s": rates,
        "per_round_ratio": per_round,
        "median_images_per_s": {k: float(np.median(v)) for k, v in rates.items()},
        "best_images_per_s": best,
        "ratios": ratios,
        "ratio_quartiles": quartiles,
        "ratio_arcfold_over_bare": ratios["arcfold/bare"],
        "ratio_of_best_rounds": best["arcfold"] / best["bare"],
        "target_met": ratios["arcfold/bare"] >= TARGET,
        "profile": profile,
    }


def markdown(pl: dict, a: argparse.Namespace) -> str:
    best, pr, mem, ratios = pl["best_images_per_s"], pl["profile"], pl["memory"], pl["ratios"]
    ratio = pl["ratio_arcfold_over_bare"]
    verdict = "**met**" if pl["target_met"] else f"**not met** (shortfall {(TARGET - ratio) * 100:.1f} points)"

    def mib(impl: str) -> str:
        m = mem[impl]
        return m["error"][:60] if "error" in m else f"{m['peak_mib']:.0f} (+{m['extra_mib']:.0f})"

    what = {
        "arcfold": "arcfold, batch-level shift (`data.batch_augment=true`, default)",
        "arcfold_per_image": "arcfold, albumentations shift per image (`data.batch_augment=false`)",
        "bare": "bare loop, preloaded float tensors, no augmentation",
        "bare_shift": "bare loop, preloaded uint8, the same per-image shift + normalisation per batch",
        "bare_foreach": "bare loop as `bare`, the optimizer torch's foreach Adam (arcfold's before it was fused)",
    }
    quart = pl["ratio_quartiles"]
    who = "arcfold with these overrides" if pl["overrides"] else "arcfold's default"

    def r(key: str) -> str:
        return f"{ratios[key]:.3f} ({quart[key][0]:.3f}-{quart[key][1]:.3f})"

    cells = {
        "arcfold": (r("arcfold/bare"), r("arcfold/bare_shift")),
        "arcfold_per_image": (r("arcfold_per_image/bare"), r("arcfold_per_image/bare_shift")),
        "bare": ("1", ""),
        "bare_shift": (r("bare_shift/bare"), "1"),
        "bare_foreach": (r("bare_foreach/bare"), ""),
    }
    rows = [
        f"| {what[n]} | {pl['median_images_per_s'][n]:.1f} | {best[n]:.1f} | {cells[n][0]} | {cells[n][1]} | {mib(n)} |"
        for n in LOOPS
    ]
    return "\n".join(
        [
            "## Training throughput: `train_one_epoch` on the real data path vs bare loops on preloaded tensors"
            + (f" ({' '.join(a.set)})" if a.set else ""),
            "",
            f"Command: `python benchmarks/bench_train.py --rounds {a.rounds} --round-batches {a.round_batches}"
            + (f" --set {' '.join(a.set)} --name {a.name}" if a.set else "")
            + "`  ",
            f"Machine: {machine_line(pl['machine'])}  ",
            f"GPU: {NO_GPU}; CUDA fp16/bf16 rows skipped.",
            "",
            f"Same model, head and optimiser (fused Adam; `{pl['config']}`"
            + (f" with {', '.join(pl['overrides'])}" if pl["overrides"] else "")
            + f": resnet18, output_stride {pl['output_stride'] or 32}, {pl['image_size']} px, batch "
            f"{pl['batch_size']}, augmentation `{pl['augment']}`, {pl['n_train_images']} fold-0 training images; "
            f"num_workers={pl['num_workers']}, channels_last={pl['channels_last']}). Alternating rounds "
            f"({pl['rounds']} x {pl['round_batches']} batches, the loops' order rotated each round), one process; "
            "the image caches are filled first. Ratio = median of the per-round ratios (each round runs the loops "
            "back to back), in brackets their quartiles. Peak RSS: one fresh subprocess per loop, peak (+ extra "
            "over the loaded data). Shared 2-core VM: compare the ratios.",
            "",
            "| loop | median img/s | best img/s | ratio to bare | ratio to bare + same shift | peak MiB |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Target: {who} >= {TARGET}x the bare loop: {verdict} (ratio of the best rounds "
            f"{pl['ratio_of_best_rounds']:.3f}).",
            "",
            "ms per batch (best rounds): each arcfold data path alone (cached images, per-image work, collate, and the "
            "batch-level shift + normalisation where used; measured separately), the bare steps, arcfold's whole "
            "step, and the remainder over bare step + data (guards, gradient-norm check, scheduler, `loss.item()`, "
            "noise):",
            "",
            "| data path | data | bare step | arcfold step | remainder |",
            "|---|---|---|---|---|",
            *(
                f"| {n} | {pr[n + '_data_ms_per_batch']:.1f} | {pr['bare_step_ms_per_batch']:.1f} | "
                f"{pr[n + '_ms_per_batch']:.1f} | {pr[n + '_remainder_ms_per_batch']:.1f} |"
                for n in ("arcfold", "arcfold_per_image")
            ),
            "",
            f"The bare loop with the same shift: {pr['bare_shift_ms_per_batch']:.1f} ms per batch.",
        ]
    )


if __name__ == "__main__":
    main()
