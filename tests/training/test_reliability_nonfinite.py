"""Non-finite steps: a NaN/inf loss, or inf/NaN gradients behind a finite loss (what GradScaler catches under fp16),
is skipped and counted; ``train.max_nonfinite_steps`` in a row stop the run with a clear message, and the last
good checkpoint stays to resume from."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import arcfold.stages.train
import arcfold.training.fold
from arcfold.config import load_config
from arcfold.errors import NonFiniteLossError
from arcfold.io import load_torch
from arcfold.models.embedding import build_model
from arcfold.models.heads import build_head
from arcfold.training.fold import train_fold
from arcfold.training.loop import train_one_epoch
from arcfold.training.paths import FoldPaths
from arcfold.training.schedule import build_optimizer
from arcfold.training.step import NonFiniteGuard, OptimizerStep

from ..conftest import TINY, mini_overrides, write_mini_dataset


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward returns inf: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def _sabotage(head: torch.nn.Module, bad_calls, kind: str) -> torch.nn.Module:
    """Make ``head``'s forward return a NaN loss (``kind="loss"``) or inf gradients (``"grad"``) on the listed
    calls (0-based), in place: the head keeps its class and state_dict, so a checkpoint of it resumes normally."""
    forward, calls = head.forward, {"n": 0}

    def sabotaged(embeddings, labels):
        loss = forward(embeddings, labels)
        bad = calls["n"] in bad_calls
        calls["n"] += 1
        if not bad:
            return loss
        return loss * math.nan if kind == "loss" else _InfGrad.apply(loss)

    head.forward = sabotaged
    return head


# --------------------------------------------------------------------------------------------
# the loop


def _setup(*overrides, n_batches=6, amp_scaler=False):
    cfg = load_config(None, [*TINY, "model.embedding_size=16", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    head = build_head(cfg.head, cfg.model.embedding_size, 5)
    optimizer = build_optimizer(cfg, model, head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # a GradScaler on CPU: fp16 autocast is not supported there, but the scaler's skip logic is the same
    scaler = torch.amp.GradScaler("cpu", enabled=amp_scaler, init_scale=2.0**10)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))) for _ in range(n_batches)]
    return cfg, model, head, optimizer, scheduler, scaler, batches


def _epoch(cfg, model, head, optimizer, scheduler, scaler, batches, guard=None, epoch=0):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return train_one_epoch(
        cfg, model, head, batches, len(batches),
        OptimizerStep.from_config(cfg, optimizer, scheduler, scaler, params, guard),
        torch.device("cpu"), None, epoch,
    )  # fmt: skip


def _all_finite(*modules) -> bool:
    return all(torch.isfinite(t).all() for m in modules for t in [*m.parameters(), *m.buffers()])


def test_grad_scaler_skips_are_counted_and_stop_the_run_after_the_limit():
    cfg, model, head, optimizer, scheduler, scaler, batches = _setup("train.max_nonfinite_steps=4", amp_scaler=True)
    stats = _epoch(cfg, model, _sabotage(head, {1, 2}, "grad"), optimizer, scheduler, scaler, batches)
    assert stats["skipped_steps"] == 2 and stats["skipped_batches"] == 0  # the loss was finite each time
    assert scaler.get_scale() == 2.0**10 / 4  # GradScaler halved its scale at each skip
    assert optimizer.state[head.weight]["step"].item() == 4 and _all_finite(model, head)
    with pytest.raises(NonFiniteLossError, match=r"4 training steps in a row skipped.*GradScaler found inf/NaN"):
        _epoch(cfg, model, _sabotage(head, range(6), "grad"), optimizer, scheduler, scaler, batches)
    assert _all_finite(model, head)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_inf_gradients_behind_a_finite_loss_are_skipped_without_amp_too():
    cfg, model, head, optimizer, scheduler, scaler, batches = _setup("train.grad_clip=0")
    before = [p.detach().clone() for p in [*model.parameters(), *head.parameters()]]
    stats = _epoch(cfg, model, _sabotage(head, {0}, "grad"), optimizer, scheduler, scaler, batches[:1])
    assert stats["skipped_steps"] == 1 and "step" not in optimizer.state.get(head.weight, {})
    assert all(torch.equal(p, b) for p, b in zip([*model.parameters(), *head.parameters()], before, strict=True))


def test_the_count_of_skips_in_a_row_carries_over_epochs():
    cfg, model, head, optimizer, scheduler, scaler, batches = _setup("train.max_nonfinite_steps=3", n_batches=4)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    _epoch(cfg, model, _sabotage(head, {2, 3}, "loss"), optimizer, scheduler, scaler, batches, guard)
    assert guard.in_a_row == 2  # the epoch ended on two skipped batches
    head = build_head(cfg.head, cfg.model.embedding_size, 5)
    with pytest.raises(NonFiniteLossError, match=r"3 training steps in a row skipped.*epoch 1, batch 0: loss is nan"):
        _epoch(cfg, model, _sabotage(head, {0}, "loss"), optimizer, scheduler, scaler, batches, guard, epoch=1)


# --------------------------------------------------------------------------------------------
# a whole fold: stop, keep the last good checkpoint, resume


def test_a_diverging_fold_stops_keeps_its_checkpoint_and_resumes(tmp_path, monkeypatch, caplog):
    write_mini_dataset(tmp_path / "input")
    overrides = [*mini_overrides(tmp_path), "train.max_nonfinite_steps=3"]
    real_build_head = arcfold.training.fold.build_head

    def diverging_head(*args, **kwargs):  # 3 batches per epoch: every batch of epoch 1 is NaN
        return _sabotage(real_build_head(*args, **kwargs), range(3, 100), "loss")

    monkeypatch.setattr(arcfold.training.fold, "build_head", diverging_head)
    with pytest.raises(SystemExit) as e:  # the CLI: one clear line and exit code 2, not a traceback
        arcfold.stages.train.main(["--fold", "0", *overrides])
    assert e.value.code == 2
    cfg = load_config(None, overrides)
    paths = FoldPaths(cfg, 0)
    last = f"the last good checkpoint is kept: {paths.last} (resume with train.resume=true)"
    assert (
        "3 training steps in a row skipped (train.max_nonfinite_steps=3), the last at epoch 1, batch 2: loss is nan. "
        "Lower optim.lr" in caplog.text
    )
    assert last in caplog.text
    assert load_torch(paths.last)["epoch"] == 0 and not paths.oof.exists()
    assert not list(paths.work.glob("best_*"))  # train.keep=last writes the kept files at the last epoch only
    assert pd.read_csv(paths.history)["epoch"].tolist() == [0]

    monkeypatch.setattr(arcfold.training.fold, "build_head", real_build_head)  # the cause fixed (a transient blow-up)
    scores = train_fold(load_config(None, [*overrides, "train.resume=true"]), 0)
    assert paths.oof.exists() and scores["skipped_batches"] == 0
    assert pd.read_csv(paths.history)["epoch"].tolist() == [0, 1, 2]
