"""Every objective trains through the real fold loop; every literature preset loads and builds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arcfold.config import load_config
from arcfold.io import load_npz
from arcfold.models.heads import build_head
from arcfold.training.fold import train_fold

from ..conftest import REPO, TINY, tmp_path_overrides

PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))


def test_there_is_a_preset_for_every_head_and_loss():
    from arcfold.models.heads import HEADS
    from arcfold.models.losses import LOSSES

    names = {load_config(p).head.name for p in PRESETS}
    assert names == set(HEADS) | set(LOSSES)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_names_its_source_and_builds_its_head(preset):
    text = preset.read_text()
    assert "Source:" in text  # each preset says where its numbers come from
    cfg = load_config(preset)
    counts = np.array([4, 6, 5, 9, 4])
    head = build_head(cfg.head, cfg.model.embedding_size, len(counts), class_counts=counts)
    embeddings, labels = torch.randn(16, cfg.model.embedding_size), torch.arange(16) % 4
    assert math.isfinite(head(embeddings, labels).item())
    if cfg.sampler.m_per_class:
        assert cfg.train.batch_size % cfg.sampler.m_per_class == 0


@pytest.mark.parametrize(
    "objective",
    [
        ["head.name=multi_similarity", "head.miner=multi_similarity", "sampler.m_per_class=4"],
        ["head.name=triplet", "head.direction_gamma=0.5", "sampler.m_per_class=4"],
        ["head.name=subcenter_arcface", "head.dynamic_margin=minmax", "head.margin_warmup_epochs=1"],
    ],
    ids=["ms_miner_sampler", "triplet_direction", "subcenter_dynamic_warmup"],
)
def test_objective_trains_a_fold_end_to_end(objective, tmp_path, glyphs_input):
    overrides = [*tmp_path_overrides(tmp_path), f"data.input_dir={glyphs_input}", *TINY]
    overrides += ["name=objective", "train.epochs=1", "train.limit_train_batches=4", *objective]
    cfg = load_config(REPO / "configs" / "glyphs_arcface.yaml", overrides)
    scores = train_fold(cfg, 0)
    oof = load_npz(cfg.oof_dir / "fold0.npz")
    assert np.isfinite(oof["embeddings"]).all() and 0.0 < scores["recall@1"] <= 1.0
    assert scores["git_commit"] != ""
