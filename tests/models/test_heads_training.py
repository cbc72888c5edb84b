"""Every head trains: the loss falls within 10 optimiser steps, and mixed-precision steps stay finite."""

import numpy as np
import pytest
import torch
from torch import nn

from arcfold.config import HeadConfig
from arcfold.models.heads import build_head

N_CLASSES, DIM, BATCH = 8, 16, 64
COUNTS = np.array([1, 2, 4, 8, 16, 32, 64, 128])  # class sizes for dynamic margins and class weights

CONFIGS = {
    "softmax": HeadConfig(name="softmax"),
    "norm_softmax": HeadConfig(name="norm_softmax", scale=16.0),
    "cosface": HeadConfig(name="cosface", scale=30.0, margin=0.35),
    "arcface": HeadConfig(name="arcface", scale=30.0, margin=0.5),
    "subcenter_arcface": HeadConfig(name="subcenter_arcface", scale=30.0, margin=0.5, subcenters=3),
    "adacos": HeadConfig(name="adacos"),
    "arcface_power_margins": HeadConfig(name="arcface", dynamic_margin="power"),
    "cosface_minmax_margins": HeadConfig(name="cosface", dynamic_margin="minmax"),
    "subcenter_minmax_margins": HeadConfig(name="subcenter_arcface", dynamic_margin="minmax"),
    "arcface_focal_inv_log": HeadConfig(name="arcface", loss="focal", focal_gamma=2.0, class_weights="inv_log"),
    "softmax_focal": HeadConfig(name="softmax", loss="focal", focal_gamma=2.0),
    "adacos_inv_log": HeadConfig(name="adacos", class_weights="inv_log"),
}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, DIM, generator=g), torch.arange(BATCH) % N_CLASSES


@pytest.mark.parametrize("key", list(CONFIGS))
def test_loss_falls_within_10_steps(key):
    # fixed random embeddings as parameters + the head, Adam: the objective must be learnable at all
    torch.manual_seed(0)
    emb, labels = _batch()
    emb = nn.Parameter(emb)
    head = build_head(CONFIGS[key], DIM, N_CLASSES, COUNTS)
    opt = torch.optim.Adam([emb, *head.parameters()], lr=0.05)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = head(emb, labels).item()
    assert final < 0.7 * losses[0], f"{key}: {losses[0]:.3f} -> {final:.3f} ({[round(x, 3) for x in losses]})"


def _train_steps(key, device, amp_dtype, n_steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, DIM)).to(device)
    head = build_head(CONFIGS[key], DIM, N_CLASSES, COUNTS).to(device)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
    x, labels = _batch()
    x, labels = 20 * x.to(device), labels.to(device)  # large inputs: large pre-normalisation embeddings
    losses = []
    for _ in range(n_steps):
        opt.zero_grad()
        with torch.autocast(device, dtype=amp_dtype):
            emb = model(x)
            loss = head(emb, labels)
        assert emb.dtype == amp_dtype  # the embeddings really are low precision
        assert loss.dtype == torch.float32 and loss.shape == ()
        assert torch.isfinite(loss), f"{key}: loss {loss.item()}"
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    for name, p in [*model.named_parameters(), *head.named_parameters(), *head.named_buffers()]:
        assert torch.isfinite(p).all(), f"{key}: {name} is not finite"
    return losses


@pytest.mark.parametrize("key", list(CONFIGS))
def test_bf16_autocast_steps_on_cpu_stay_finite(key):
    _train_steps(key, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for fp16 autocast")
@pytest.mark.parametrize("key", list(CONFIGS))
def test_fp16_autocast_steps_on_cuda_stay_finite(key):
    _train_steps(key, "cuda", torch.float16)
