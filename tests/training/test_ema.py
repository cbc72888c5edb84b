"""EMA of the weights (``train.ema_decay``, :mod:`arcfold.ema`): the averaged weights against the closed form, the
files that must hold them (validation, OOF embeddings, ``fold<K>.pt``), the updates counted per applied optimizer
step, and a resume that continues the EMA to the bit.

Training runs use the tiny deterministic config of ``conftest.mini_overrides`` on one torch thread."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import arcfold.training.fold
import arcfold.training.schedule
from arcfold.config import load_config
from arcfold.data.dataset import ImageDataset
from arcfold.data.table import image_root, read_csv, resolve_image_paths
from arcfold.data.transforms import build_eval_transform
from arcfold.errors import ArtifactExistsError, ConfigError
from arcfold.inference.embed import extract_embeddings
from arcfold.io import load_json, load_npz, load_torch
from arcfold.models.embedding import build_model, load_embedding_model
from arcfold.models.heads import build_head
from arcfold.training.ema import WeightEma, build_ema
from arcfold.training.fold import train_fold
from arcfold.training.loop import train_one_epoch
from arcfold.training.paths import FoldPaths
from arcfold.training.schedule import build_optimizer
from arcfold.training.step import OptimizerStep

from ..conftest import TINY, mini_overrides, write_mini_dataset

DECAY = 0.9  # far from 1, so that one update moves the EMA measurably


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    write_mini_dataset(root / "input")
    return root


def _overrides(root, run: str, *extra: str) -> list[str]:
    return [*mini_overrides(root / run), f"data.input_dir={root / 'input'}", *extra]


@pytest.fixture(scope="module")
def ema_run(mini_root):
    """2 epochs of 1 batch (2 optimizer steps), EMA without warm-up. Captures the weights the optimizer starts from
    (w0) and every ``last.pt`` written (read back from disk: the raw weights and the EMA after each epoch)."""
    cfg = load_config(None, _overrides(mini_root, "run", "train.epochs=2", "train.limit_train_batches=1",
                                       f"train.ema_decay={DECAY}", "train.ema_warmup=false"))  # fmt: skip
    start, states = {}, []
    real_optimizer, real_save = arcfold.training.schedule.build_optimizer, arcfold.training.fold.save_torch

    def spy_optimizer(cfg, model, head):  # called once the weights are initialised, before any step
        start.update(copy.deepcopy({"model": model.state_dict(), "head": head.state_dict()}))
        return real_optimizer(cfg, model, head)

    def spy_save(path, obj):
        real_save(path, obj)
        if path.name == "last.pt":
            states.append(load_torch(path))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(arcfold.training.fold, "build_optimizer", spy_optimizer)
        mp.setattr(arcfold.training.fold, "save_torch", spy_save)
        scores = train_fold(cfg, 0)
    assert [s["epoch"] for s in states] == [0, 1] and all(s["ema"]["updates"] == e + 1 for e, s in enumerate(states))
    return cfg, scores, start, states


def _split(ema_state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(f"{part}."): v for k, v in ema_state.items() if k.startswith(f"{part}.")}


def test_after_each_step_the_ema_is_d_times_the_old_average_plus_1_minus_d_times_the_new_weights(ema_run):
    _, _, start, states = ema_run
    w1 = {"model": states[0]["model"], "head": states[0]["head"]}
    w2 = {"model": states[1]["model"], "head": states[1]["head"]}
    ema1 = {part: _split(states[0]["ema"]["state_dict"], part) for part in ("model", "head")}
    ema2 = {part: _split(states[1]["ema"]["state_dict"], part) for part in ("model", "head")}
    n_checked = 0
    for part in ("model", "head"):
        assert ema1[part].keys() == w1[part].keys() == start[part].keys()
        for key, w0 in start[part].items():
            if not w0.is_floating_point():  # num_batches_tracked: copied
                assert torch.equal(ema1[part][key], w1[part][key]) and torch.equal(ema2[part][key], w2[part][key])
                continue
            # parameters and BatchNorm running statistics alike (ModelEmaV3's default: buffers are averaged)
            torch.testing.assert_close(ema1[part][key], DECAY * w0 + (1 - DECAY) * w1[part][key], rtol=0, atol=1e-6)
            torch.testing.assert_close(
                ema2[part][key], DECAY * ema1[part][key] + (1 - DECAY) * w2[part][key], rtol=0, atol=1e-6
            )
            n_checked += 1
    assert n_checked > 50
    # the steps were real: the averaged weights are neither the start nor the trained ones
    assert (w1["head"]["weight"] - start["head"]["weight"]).abs().max() > 1e-4
    assert (ema1["head"]["weight"] - w1["head"]["weight"]).abs().max() > 1e-5
    bn = "backbone.bn1.running_mean"
    assert (w1["model"][bn] - start["model"][bn]).abs().max() > 1e-4  # BN statistics moved, and were averaged


def test_validation_oof_embeddings_and_checkpoint_are_the_ema_weights(ema_run):
    cfg, scores, _, states = ema_run
    paths = FoldPaths(cfg, 0)
    ckpt = load_torch(paths.weights)
    final = states[-1]
    ema_model, ema_head = _split(final["ema"]["state_dict"], "model"), _split(final["ema"]["state_dict"], "head")
    assert ckpt["state_dict"].keys() == ema_model.keys()
    assert all(torch.equal(ckpt["state_dict"][k], ema_model[k]) for k in ema_model)
    assert all(torch.equal(ckpt["head"][k], ema_head[k]) for k in ema_head)
    assert not torch.equal(ckpt["state_dict"]["neck.0.weight"], final["model"]["neck.0.weight"])  # not the raw ones

    # the OOF file holds the embeddings of the EMA model, not of the raw one
    oof = load_npz(paths.oof)
    folds = read_csv(cfg.folds_path)
    val_df = folds[folds["fold"] == "0"].reset_index(drop=True)
    dataset = ImageDataset(
        resolve_image_paths(val_df, image_root(cfg.data)), None, build_eval_transform(32), cache=True, size=32
    )
    ema_model_rebuilt, _, _ = load_embedding_model(paths.weights)
    raw_model = build_model(cfg.model)
    raw_model.load_state_dict(final["model"])
    embed = lambda m: extract_embeddings(m, dataset, batch_size=64, progress=False)  # noqa: E731
    np.testing.assert_allclose(oof["embeddings"], embed(ema_model_rebuilt), rtol=0, atol=1e-6)
    assert np.abs(oof["embeddings"] - embed(raw_model)).max() > 1e-3
    # recorded: the fold JSON and history.csv (the decay of each epoch's last update)
    assert scores["ema_decay"] == DECAY and scores["ema_warmup"] is False and load_json(paths.scores) == scores
    assert pd.read_csv(paths.history)["ema_decay"].tolist() == [DECAY, DECAY]


def test_warmup_decay_is_modelemav3s_1_minus_n_to_the_minus_2_3_capped_at_ema_decay():
    model, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    ema = build_ema(model, head, decay=0.5, warmup=True)
    assert isinstance(ema, WeightEma) and build_ema(model, head, 0.0, True) is None
    expected = torch.zeros(2, 2)
    for n in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(float(n))
        ema.update()
        decay = min(0.5, 1 - n ** (-2 / 3))  # n=1: 0 (the EMA restarts from the trained weights); n=2: 0.370; 3+: 0.5
        expected = decay * expected + (1 - decay) * model.weight.detach()
        assert ema.last_decay == pytest.approx(decay, abs=1e-12)
        torch.testing.assert_close(ema.model.weight, expected, rtol=0, atol=1e-6)
    assert ema.updates == 4 and [round(1 - n ** (-2 / 3), 3) for n in (2, 3)] == [0.370, 0.519]


class _NaNOnCalls(torch.nn.Module):
    """A head returning an infinite loss on the listed calls (a skipped step)."""

    def __init__(self, head, bad_calls):
        super().__init__()
        self.head, self.bad, self.calls = head, set(bad_calls), 0

    def forward(self, embeddings, labels):
        self.calls += 1
        loss = self.head(embeddings, labels)
        return loss * math.inf if self.calls - 1 in self.bad else loss


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
@pytest.mark.parametrize("accum, bad, updates", [(1, set(), 6), (2, set(), 3), (1, {0, 3}, 4), (2, {0}, 2)])
def test_the_ema_is_updated_once_per_applied_optimizer_step(accum, bad, updates):
    """6 batches: one update per window of accum_steps batches, none for a window a non-finite loss skipped."""
    cfg = load_config(None, [*TINY, "model.embedding_size=16", f"train.accum_steps={accum}"])
    torch.manual_seed(0)
    model, head = build_model(cfg.model), build_head(cfg.head, 16, 5)
    optimizer = build_optimizer(cfg, model, head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))) for _ in range(6)]
    ema = build_ema(model, head, 0.99, warmup=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_one_epoch(
        cfg, model, _NaNOnCalls(head, bad), batches, 6,
        OptimizerStep.from_config(cfg, optimizer, scheduler, scaler, params, ema=ema),
        torch.device("cpu"), None, 0,
    )  # fmt: skip
    assert ema.updates == updates == optimizer.state[head.weight]["step"].item()
    assert stats["ema_decay"] == pytest.approx(min(0.99, 1 - updates ** (-2 / 3)))


class _Stop(Exception):
    pass


def test_a_stopped_and_resumed_run_continues_the_ema_bit_identically(mini_root):
    """2 epochs straight == 1 epoch, stop, resume (warm-up on: its step count is part of the resume state). A
    resume that changes train.ema_decay is refused (check_resume_config)."""
    ema = ["train.epochs=2", "train.limit_train_batches=2", "train.ema_decay=0.99"]
    straight = load_config(None, _overrides(mini_root, "straight", *ema))
    train_fold(straight, 0)

    stopped = _overrides(mini_root, "stopped", *ema)

    def stop_in_epoch_1(row) -> None:
        if row["epoch"] == 1:
            raise _Stop  # before epoch 1's resume point: the run resumes from epoch 0

    with pytest.raises(_Stop):
        train_fold(load_config(None, stopped), 0, on_epoch_end=stop_in_epoch_1)
    paths = FoldPaths(load_config(None, stopped), 0)
    assert load_torch(paths.last)["ema"]["updates"] == 2
    with pytest.raises(ArtifactExistsError, match=r"another config \(train.ema_decay: 0.99 -> 0.999\)"):
        train_fold(load_config(None, [*stopped, "train.resume=true", "train.ema_decay=0.999"]), 0)
    train_fold(load_config(None, [*stopped, "train.resume=true"]), 0)

    ref = FoldPaths(straight, 0)
    a, b = load_torch(paths.weights), load_torch(ref.weights)
    for part in ("state_dict", "head"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part
    np.testing.assert_array_equal(load_npz(paths.oof)["embeddings"], load_npz(ref.oof)["embeddings"])
    assert pd.read_csv(paths.history)["ema_decay"].tolist() == pytest.approx([1 - 2 ** (-2 / 3), 1 - 4 ** (-2 / 3)])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.ema_decay=1.0"], r"train.ema_decay must be in \[0, 1\)"),
        (["train.ema_decay=-0.1"], r"train.ema_decay must be in \[0, 1\)"),
        (["train.ema_decay=0.999", "head.sharded=true"], "train.ema_decay is not supported with head.sharded=true"),
    ],
)
def test_impossible_ema_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
