"""Inference embedding throughput: ``arcfold.infer.embed_images`` against a bare ``model.embed(x)`` loop.

One resnet18 embedding model (glyphs_arcface config, 64 px, random init, eval mode) embeds the glyph set
(``input/glyphs``; made by ``python -m arcfold prepare glyphs`` if missing):

* arcfold: ``embed_images(ensemble_of_one, paths, tta=TTAConfig(), batch_size=128, num_workers=0)``: decodes each
  PNG, resizes if needed, normalises (albumentations eval transform), collates with a DataLoader, embeds, and
  L2-normalises the fold mean, exactly as ``python -m arcfold infer`` does.
* bare: the same images decoded and normalised once, before the clock starts, into one (N, 3, 64, 64) tensor;
  then ``model.embed(x[i:i+128])`` under ``torch.inference_mode()``.

Images/s alternate over ``--rounds`` rounds in one process (medians; shared noisy 2-core VM). Target:
arcfold >= 0.95x bare. The per-image cost of each data stage (decode, resize, normalise, collate) is measured on the
same images so the gap can be attributed. CUDA/AMP rows are skipped without a GPU. Run from the project root::

    python benchmarks/bench_extract.py [--rounds 5] [--n-images 2048]

Writes ``benchmarks/results/bench_extract.json`` and its section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import NO_GPU, cuda_available, machine, machine_line, peak_rss_mib, write_results  # noqa: E402

NAME = "bench_extract"
BATCH = 128


def glyph_paths(n_images: int) -> list[str]:
    import pandas as pd

    root = Path("input/glyphs")
    if not (root / "train.csv").exists():
        import subprocess

        subprocess.run([sys.executable, "-m", "arcfold", "prepare", "glyphs"], check=True)
    df = pd.read_csv(root / "train.csv")
    return [str(root / p) for p in df["image"].tolist()[:n_images]]


def build(size: int):
    from arcfold.config import load_config
    from arcfold.infer import Ensemble, FoldModel
    from arcfold.models.embedding import build_model

    cfg = load_config("configs/glyphs_arcface.yaml", [f"data.image_size={size}", "model.backbone=resnet18"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    return model, Ensemble(
        name="bench", experiments=["bench"], weights=[1.0], models=[FoldModel("bench", 0, model, size)]
    )


def stage_profile(paths: list[str], size: int) -> dict:
    """Seconds per image of each data stage of ``embed_images`` (single process, as with num_workers=0)."""
    import cv2
    from torch.utils.data import default_collate

    from arcfold.data.dataset import read_image
    from arcfold.data.transforms import build_eval_transform

    transform = build_eval_transform(size)
    t0 = time.perf_counter()
    images = [read_image(p) for p in paths]
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    resized = [im if im.shape[:2] == (size, size) else cv2.resize(im, (size, size), cv2.INTER_AREA) for im in images]
    t_resize = time.perf_counter() - t0
    t0 = time.perf_counter()
    views = [{size: transform(image=im)["image"]} for im in resized]
    t_norm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(views), BATCH):
        default_collate(views[i : i + BATCH])
    t_collate = time.perf_counter() - t0
    n = len(paths)
    return {
        "decode_ms_per_image": 1000 * t_decode / n,
        "resize_ms_per_image": 1000 * t_resize / n,
        "normalise_ms_per_image": 1000 * t_norm / n,
        "collate_ms_per_image": 1000 * t_collate / n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n-images", type=int, default=2048)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()

    from arcfold.data.dataset import read_image
    from arcfold.data.transforms import build_eval_transform
    from arcfold.infer import TTAConfig, embed_images

    cuda_available(NAME)
    torch.set_num_threads(os.cpu_count() or 1)
    paths = glyph_paths(a.n_images)
    model, ensemble = build(a.size)
    transform = build_eval_transform(a.size)
    x = torch.stack([transform(image=read_image(p, a.size))["image"] for p in paths])  # (N, 3, H, W), preloaded

    @torch.inference_mode()
    def bare() -> np.ndarray:
        return torch.cat([model.embed(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]).numpy()

    def ours() -> np.ndarray:
        return embed_images(ensemble, paths, tta=TTAConfig(), batch_size=BATCH, device="cpu", progress=False)

    bare(), ours()  # warm-up: first-call allocations, thread pools
    rates: dict[str, list[float]] = {"arcfold": [], "bare": []}
    outputs = {}
    for r in range(a.rounds):
        for name, fn in [("arcfold", ours), ("bare", bare)][:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            outputs[name] = fn()
            rates[name].append(len(paths) / (time.perf_counter() - t0))
        print(f"[{NAME}] round {r}: arcfold {rates['arcfold'][-1]:.0f} img/s, bare {rates['bare'][-1]:.0f} img/s")
    max_diff = float(np.abs(outputs["arcfold"] - outputs["bare"]).max())
    med = {k: float(np.median(v)) for k, v in rates.items()}
    ratio = med["arcfold"] / med["bare"]
    model_ms = 1000 / med["bare"]
    profile = {**stage_profile(paths, a.size), "model_ms_per_image": model_ms}
    payload = {
        "machine": machine(),
        "n_images": len(paths),
        "image_size": a.size,
        "batch_size": BATCH,
        "rounds": a.rounds,
        "images_per_s": rates,
        "median_images_per_s": med,
        "ratio_arcfold_over_bare": ratio,
        "target_met": ratio >= 0.95,
        "max_abs_embedding_diff": max_diff,
        "profile": profile,
        "peak_rss_mib": peak_rss_mib(),
        "cuda": "skipped: " + NO_GPU,
    }
    print(f"[{NAME}] ratio {ratio:.3f}, profile {profile}")
    write_results(NAME, payload, markdown(payload, a))


def markdown(pl: dict, a: argparse.Namespace) -> str:
    med, pr = pl["median_images_per_s"], pl["profile"]
    data_ms = sum(v for k, v in pr.items() if k != "model_ms_per_image")
    verdict = (
        "**met**"
        if pl["target_met"]
        else f"**not met**: shortfall {(0.95 - pl['ratio_arcfold_over_bare']) * 100:.1f} points below 0.95"
    )
    return "\n".join(
        [
            "## Embedding extraction (inference): `embed_images` vs a bare `model.embed(x)` loop",
            "",
            f"Command: `python benchmarks/bench_extract.py --rounds {a.rounds} --n-images {a.n_images} "
            f"--size {a.size}`  ",
            f"Machine: {machine_line(pl['machine'])}  ",
            f"GPU: {NO_GPU}; CUDA fp16/bf16 rows skipped.",
            "",
            f"resnet18 (glyphs_arcface config, random init, eval), {pl['image_size']} px, batch {pl['batch_size']}, "
            f"{pl['n_images']} glyph PNGs, num_workers=0 (the inference default). Alternating rounds ({pl['rounds']})"
            " in one process, medians; shared noisy 2-core VM, compare the ratio.",
            "",
            "| arcfold img/s | bare img/s | ratio | target >= 0.95 | max abs embedding diff | peak RSS MiB |",
            "|---|---|---|---|---|---|",
            f"| {med['arcfold']:.0f} | {med['bare']:.0f} | {pl['ratio_arcfold_over_bare']:.3f} | {verdict} | "
            f"{pl['max_abs_embedding_diff']:.1e} | {pl['peak_rss_mib']:.0f} |",
            "",
            "Where the time goes, ms per image (data stages measured separately on the same images, single process):",
            "",
            "| decode | resize | normalise | collate | data total | model (bare loop) |",
            "|---|---|---|---|---|---|",
            f"| {pr['decode_ms_per_image']:.3f} | {pr['resize_ms_per_image']:.3f} | {pr['normalise_ms_per_image']:.3f} "
            f"| {pr['collate_ms_per_image']:.3f} | {data_ms:.3f} | {pr['model_ms_per_image']:.3f} |",
        ]
    )


if __name__ == "__main__":
    main()
