"""The fair reference: what a user writes by hand in ~60 lines of plain PyTorch + pytorch-metric-learning.

The recipe is issue 16's, all standard choices, nothing from arcfold (so nothing arcfold does can leak into it):

- ``timm.create_model(backbone, num_classes=0)`` (global average pooling) -> ``Linear(512, 512)`` ->
  ``BatchNorm1d(512)``; L2-normalised for retrieval (the evaluator normalises).
- ``pytorch_metric_learning.losses.ArcFaceLoss(n_classes, 512, margin=28.6, scale=30)`` (degrees: 0.5 rad).
- Adam, lr 1e-3 for the network and 1e-2 for the loss's class centres; ``OneCycleLR`` over all steps
  (``pct_start=0.1``, its default cosine annealing and beta1 cycling), one ``sched.step()`` per batch; no weight
  decay, no gradient clipping.
- Images: greyscale -> 3 channels, torchvision's ``Resize`` (bilinear, antialiased: its default) to ``size`` px,
  scaled to [0, 1] by ``to_tensor`` (no mean/std normalisation: the first BatchNorm absorbs it); the only
  augmentation is a random shift of up to +-4 px (``torch.roll`` on the batch), one draw per batch.
- Seed 0, batch 64, shuffled each epoch (``drop_last=True``: BatchNorm1d needs more than one row), keep the last
  epoch (no selection).

Images are decoded once into a float tensor in RAM (a user's ``TensorDataset``), so the loop's data path costs
nothing. Used by ``benchmarks/omniglot.py``; ``python benchmarks/reference_loop.py --fold 0`` trains one fold and
prints its validation scores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from pytorch_metric_learning.losses import ArcFaceLoss
from torch import nn

__all__ = ["ReferenceNet", "embed", "load_images", "train_reference"]


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1]: greyscale, torchvision's default bilinear antialiased resize."""
    out = torch.empty(len(paths), 3, size, size)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            x = TF.to_tensor(image.convert("L"))  # (1, H, W) in [0, 1]
        out[i] = TF.resize(x, [size, size]).expand(3, -1, -1)
    return out


class ReferenceNet(nn.Module):
    def __init__(self, backbone: str = "resnet18", dim: int = 512, output_stride: int | None = None) -> None:
        super().__init__()
        extra = {} if output_stride is None else {"output_stride": output_stride}  # a sensitivity row's, not the recipe
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, **extra)
        self.neck = nn.Sequential(nn.Linear(self.backbone.num_features, dim), nn.BatchNorm1d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))


def train_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    head_lr: float = 1e-2,
    shift: int = 4,
    seed: int = 0,
    backbone: str = "resnet18",
    output_stride: int | None = None,
    on_epoch_end=None,
) -> ReferenceNet:
    """Train the reference on images ``x`` (N, 3, H, W) with integer labels ``y`` (N,) in 0..C-1."""
    torch.manual_seed(seed)
    n_classes = int(y.max()) + 1
    model = ReferenceNet(backbone, output_stride=output_stride)
    loss_fn = ArcFaceLoss(n_classes, 512, margin=28.6, scale=30)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": lr}, {"params": loss_fn.parameters(), "lr": head_lr}])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[lr, head_lr], total_steps=epochs * len(loader), pct_start=0.1
    )
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        for images, labels in loader:
            dx, dy = torch.randint(-shift, shift + 1, (2,)).tolist()
            images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
            loss = loss_fn(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, len(loader) * batch_size / (time.time() - t0))
    return model


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from arcfold.config import load_config
    from arcfold.data.folds import ensure_folds, load_folds
    from arcfold.data.table import FOLD, LABEL, image_root, resolve_image_paths
    from arcfold.datasets.prepare import ensure_dataset
    from arcfold.retrieval.metrics import retrieval_metrics

    parser = argparse.ArgumentParser(description="train the plain reference loop on one fold")
    parser.add_argument("--config", default="configs/omniglot_arcface.yaml")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="the network's (the recipe: 1e-3)")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="the class centres' (the recipe: 1e-2)")
    args = parser.parse_args()
    cfg = load_config(args.config, [])
    ensure_dataset(cfg)
    ensure_folds(cfg)
    df = load_folds(cfg.folds_path)
    root = image_root(cfg.data)
    tr, va = df[(df[FOLD] >= 0) & (df[FOLD] != args.fold)], df[df[FOLD] == args.fold]
    classes = np.sort(tr[LABEL].unique())
    x = load_images(resolve_image_paths(tr, root), cfg.data.image_size)
    y = torch.from_numpy(np.searchsorted(classes, tr[LABEL].to_numpy()))
    xv = load_images(resolve_image_paths(va, root), cfg.data.image_size)

    def report(epoch, model, ips):
        m = retrieval_metrics(embed(model, xv), va[LABEL].to_numpy())
        print(f"epoch {epoch}: {ips:.0f} img/s R@1 {m['recall@1']:.4f} MAP@R {m['map@r']:.4f}", flush=True)

    train_reference(x, y, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, on_epoch_end=report)


if __name__ == "__main__":
    main()
